rule predict:
    input:
        unpack(predict_inputs),
    output:
        directory("results/{model}/predictions/{dataset}.ome.zarr"),
    params:
        settings=section_json("predict"),
        channels=dataset_channels,
    log:
        "logs/predict/{model}/{dataset}.log",
    benchmark:
        "benchmarks/predict/{model}/{dataset}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    conda:
        ENV
    shell:
        "unetflow predict --checkpoint {input.checkpoint:q} --image {input.image:q}"
        " --stats {input.stats:q} --channels {params.channels:q} --settings {params.settings:q}"
        " --model {wildcards.model} --dataset {wildcards.dataset} --threads {threads}"
        " --output {output:q} > {log:q} 2>&1"
