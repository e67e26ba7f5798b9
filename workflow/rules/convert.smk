# TIFF datasets: a dataset's image or target given as .tif/.tiff is converted to OME-Zarr
# first; common.smk points the dataset at the conversion (TIFF_SOURCES keeps the originals).


rule convert:
    input:
        tiff_source,
    output:
        directory("results/converted/{dataset}/{role}.ome.zarr"),
    params:
        options=convert_args,
    wildcard_constraints:
        role="image|target",
    log:
        "logs/convert/{dataset}/{role}.log",
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        ENV
    shell:
        "unetflow convert {input:q} {output:q} --role {wildcards.role} {params.options}"
        " > {log:q} 2>&1"


# A collection of TIFFs: every image (and target) converted, in one job per dataset; the
# positions of the dataset are then read from the conversions.
rule convert_collection:
    input:
        collection_tiff_files,
    output:
        directory("results/converted_collections/{dataset}"),
    params:
        spec=convert_collection_spec,
    wildcard_constraints:
        dataset=TIFF_COLLECTION_DATASET,
    log:
        "logs/convert/{dataset}.collection.log",
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        ENV
    shell:
        "unetflow convert-collection --dataset {wildcards.dataset} --spec {params.spec:q}"
        " --output-dir {output:q} > {log:q} 2>&1"
