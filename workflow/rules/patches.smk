rule extract_patches:
    input:
        unpack(extract_inputs),
    output:
        store=directory("results/{model}/patches.zarr"),
        manifest="results/{model}/patches_manifest.tsv",
    params:
        datasets=extract_datasets,
        settings=section_json("patches"),
        normalize=apply_normalization,
        task=model_task,
        num_classes=num_classes,
        ignore_label=ignore_label_arg,
        target=segmentation_target_json,
    log:
        "logs/extract_patches/{model}.log",
    threads: 2
    resources:
        mem_mb=4000,
    conda:
        ENV
    shell:
        "unetflow extract-patches --datasets {params.datasets:q} --task {params.task}"
        " --settings {params.settings:q} --normalize {params.normalize:q}"
        " --num-classes {params.num_classes} {params.ignore_label}"
        " --segmentation-target {params.target:q}"
        " --store {output.store:q} --manifest {output.manifest:q} > {log:q} 2>&1"
