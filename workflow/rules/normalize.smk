rule normalize:
    input:
        unpack(normalize_inputs),
    output:
        "results/normalization/{dataset}.json",
    params:
        settings=normalize_settings,
        channels=dataset_channels,
        target=normalize_target_arg,
    wildcard_constraints:
        dataset=IMAGE_DATASET,
    log:
        "logs/normalize/{dataset}.log",
    threads: 2
    resources:
        mem_mb=4000,
    conda:
        ENV
    shell:
        "unetflow normalize --image {input.image:q} {params.target} --dataset {wildcards.dataset}"
        " --channels {params.channels:q} --settings {params.settings:q} --output {output:q}"
        " > {log:q} 2>&1"
