# Tiled prediction, sharded: create the raw store, predict its shards (separate jobs, each
# writing only its own tiles' chunks), gather into the NGFF 0.5 output. predict.shards: 1
# gives one shard job. See src/unetflow/tiling.py for the tiling.


rule predict_create:
    input:
        unpack(predict_create_inputs),
    output:
        temp(directory("results/{model}/predictions/{dataset}.shards/raw.zarr")),
    params:
        settings=predict_tile_settings,
        channels=dataset_channels,
        task=model_task,
    wildcard_constraints:
        dataset=IMAGE_DATASET,
    log:
        "logs/predict/{model}/{dataset}.create.log",
    threads: 1
    resources:
        mem_mb=2000,
        execution=execution_json("predict"),
    conda:
        ENV
    shell:
        "unetflow predict create --checkpoint {input.checkpoint:q} --task {params.task}"
        " --image {input.image:q}"
        " --channels {params.channels:q} --settings {params.settings:q}"
        " --execution {resources.execution:q} --output {output:q} > {log:q} 2>&1"


rule predict_shard:
    input:
        unpack(predict_inputs),
        raw="results/{model}/predictions/{dataset}.shards/raw.zarr",
    output:
        "results/{model}/predictions/{dataset}.shards/shard_{shard}.json",
    params:
        settings=predict_tile_settings,
        channels=dataset_channels,
        task=model_task,
    wildcard_constraints:
        dataset=IMAGE_DATASET,
        shard=r"\d+",
    log:
        "logs/predict/{model}/{dataset}.shard_{shard}.log",
    benchmark:
        "benchmarks/predict/{model}/{dataset}.shard_{shard}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
        execution=execution_json("predict"),
    conda:
        ENV
    shell:
        "unetflow predict shard --checkpoint {input.checkpoint:q} --task {params.task}"
        " --image {input.image:q}"
        " --stats {input.stats:q} --channels {params.channels:q} --settings {params.settings:q}"
        " --execution {resources.execution:q} --raw {input.raw:q} --shard {wildcards.shard}"
        " --threads {threads} --output {output:q} > {log:q} 2>&1"


rule predict:
    input:
        unpack(predict_inputs),
        raw="results/{model}/predictions/{dataset}.shards/raw.zarr",
        shards=predict_shard_records,
    output:
        directory("results/{model}/predictions/{dataset}.ome.zarr"),
    params:
        settings=section_json("predict"),
        channels=dataset_channels,
        task=model_task,
    wildcard_constraints:
        dataset=IMAGE_DATASET,
    log:
        "logs/predict/{model}/{dataset}.log",
    benchmark:
        "benchmarks/predict/{model}/{dataset}.tsv"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
        execution=execution_json("predict"),
    conda:
        ENV
    shell:
        "unetflow predict gather --checkpoint {input.checkpoint:q} --task {params.task}"
        " --image {input.image:q}"
        " --stats {input.stats:q} --channels {params.channels:q} --settings {params.settings:q}"
        " --execution {resources.execution:q} --raw {input.raw:q} --model {wildcards.model}"
        " --dataset {wildcards.dataset} --threads {threads} --output {output:q}"
        " {input.shards:q} > {log:q} 2>&1"
