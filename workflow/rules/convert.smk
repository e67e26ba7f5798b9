# TIFF datasets: a dataset's image or target given as .tif/.tiff is converted to OME-Zarr
# first; common.smk points the dataset at the conversion (TIFF_SOURCES keeps the originals).


def tiff_source(wildcards):
    key = (wildcards.dataset, wildcards.role)
    if key not in TIFF_SOURCES:
        raise WorkflowError(f"dataset '{wildcards.dataset}' has no TIFF {wildcards.role} to convert")
    return TIFF_SOURCES[key]


def convert_args(wildcards):
    """--axes / --pixel-size from the dataset's config entry, when given."""
    ds = DATASETS[wildcards.dataset]
    args = []
    if ds.get("axes"):
        args.append(f"--axes {ds['axes']}")
    if ds.get("pixel_size"):
        sizes = ",".join(f"{axis}={size}" for axis, size in sorted(ds["pixel_size"].items()))
        args.append(f"--pixel-size {sizes}")
    return " ".join(args)


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
