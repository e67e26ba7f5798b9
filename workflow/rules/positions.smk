# Plates and collections: datasets of many positions (fields of view, or images of a glob).
# Their positions are read once, at planning (common.smk: POSITION_SETS), and written to
# results/positions/<dataset>.json, which every job of the dataset reads. Work is batched:
# one prediction and one evaluation job per predict.positions_per_job positions. A batch job
# writes only its own positions into the output plate (each atomically, skipping those
# already predicted with the same model and settings); predict_finish then writes the plate
# and well metadata and the index that rule all asks for.


rule positions:
    input:
        positions_inputs,
    output:
        "results/positions/{dataset}.json",
    params:
        spec=positions_spec,
        digest=planned_digest,
        converted=CONVERTED_COLLECTIONS,
    wildcard_constraints:
        dataset=POSITIONS_DATASET,
    log:
        "logs/positions/{dataset}.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "unetflow positions --dataset {wildcards.dataset} --spec {params.spec:q}"
        " --digest {params.digest:q} --converted {params.converted:q} --output {output:q}"
        " > {log:q} 2>&1"


rule normalize_positions:
    input:
        positions="results/positions/{dataset}.json",
    output:
        "results/normalization/{dataset}.json",
    params:
        settings=normalize_settings,
        channels=dataset_channels,
        per=normalize_positions_per,
    wildcard_constraints:
        dataset=POSITIONS_DATASET,
    log:
        "logs/normalize/{dataset}.log",
    threads: 2
    resources:
        mem_mb=4000,
    conda:
        ENV
    shell:
        "unetflow normalize --positions {input.positions:q} --per {params.per:q}"
        " --dataset {wildcards.dataset} --channels {params.channels:q}"
        " --settings {params.settings:q} --output {output:q} > {log:q} 2>&1"


rule predict_positions:
    input:
        unpack(predict_positions_inputs),
    output:
        "results/{model}/predictions/{dataset}.batches/batch_{batch}.json",
    params:
        batch_keys=batch_keys,
        settings=section_json("predict"),
        channels=dataset_channels,
        task=model_task,
        root=root_of_predictions,
    wildcard_constraints:
        dataset=POSITIONS_DATASET,
        batch=r"\d+",
    log:
        "logs/predict/{model}/{dataset}.batch_{batch}.log",
    benchmark:
        "benchmarks/predict/{model}/{dataset}.batch_{batch}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        execution=execution_json("predict"),
    conda:
        ENV
    shell:
        "unetflow predict positions --checkpoint {input.checkpoint:q} --task {params.task}"
        " --positions {input.positions:q} --keys {params.batch_keys:q} --stats {input.stats:q}"
        " --channels {params.channels:q} --settings {params.settings:q}"
        " --execution {resources.execution:q} --model {wildcards.model}"
        " --dataset {wildcards.dataset} --threads {threads} --output {params.root:q}"
        " --record {output:q} > {log:q} 2>&1"


rule predict_finish:
    input:
        unpack(predict_positions_inputs),
        records=all_batch_records,
    output:
        "results/{model}/predictions/{dataset}.index.json",
    params:
        settings=section_json("predict"),
        root=root_of_predictions,
    wildcard_constraints:
        dataset=POSITIONS_DATASET,
    log:
        "logs/predict/{model}/{dataset}.finish.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "unetflow predict finish --positions {input.positions:q}"
        " --checkpoint {input.checkpoint:q} --settings {params.settings:q}"
        " --model {wildcards.model} --dataset {wildcards.dataset} --output {params.root:q}"
        " --index {output:q} {input.records:q} > {log:q} 2>&1"


rule evaluate_positions:
    input:
        unpack(evaluate_positions_inputs),
    output:
        "results/{model}/metrics/{dataset}.batches/batch_{batch}.tsv",
    params:
        batch_keys=batch_keys,
        settings=evaluate_settings("ignore_label", "iou_threshold"),
        task=model_task,
        num_classes=num_classes,
        channels=dataset_channels,
        baseline=baseline_arg,
        root=root_of_predictions,
    wildcard_constraints:
        dataset=POSITIONS_DATASET,
        batch=r"\d+",
    log:
        "logs/evaluate/{model}/{dataset}.batch_{batch}.log",
    threads: 1
    resources:
        mem_mb=4000,
        execution=execution_json("evaluate"),
    conda:
        ENV
    shell:
        "unetflow evaluate-positions --positions {input.positions:q} --keys {params.batch_keys:q}"
        " --prediction {params.root:q} --checkpoint {input.checkpoint:q} --task {params.task}"
        " --num-classes {params.num_classes} --channels {params.channels:q}"
        " --settings {params.settings:q} --execution {resources.execution:q} {params.baseline}"
        " --model {wildcards.model}"
        " --dataset {wildcards.dataset} --output {output:q} > {log:q} 2>&1"


rule evaluate_dataset:
    input:
        positions="results/positions/{dataset}.json",
        batches=all_batch_metrics,
    output:
        metrics=report(
            "results/{model}/metrics/{dataset}.json",
            caption="../report/metrics.rst",
            category="3. Metrics in detail",
            subcategory="{model}",
            labels={"model": "{model}", "dataset": "{dataset}"},
        ),
        table=report(
            "results/{model}/metrics/{dataset}_positions.tsv",
            caption="../report/positions.rst",
            category="3. Metrics in detail",
            subcategory="{model}",
            labels={"model": "{model}", "dataset": "{dataset}", "table": "per position"},
        ),
        wells="results/{model}/metrics/{dataset}_wells.tsv",
    params:
        task=model_task,
        plate_map="",
    wildcard_constraints:
        dataset=COLLECTION_DATASET,
    log:
        "logs/evaluate/{model}/{dataset}.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "unetflow evaluate-dataset --positions {input.positions:q} --task {params.task}"
        " --model {wildcards.model} --dataset {wildcards.dataset} --output {output.metrics:q}"
        " --table {output.table:q} --wells {output.wells:q} {params.plate_map}"
        " {input.batches:q} > {log:q} 2>&1"


use rule evaluate_dataset as evaluate_plate with:
    output:
        metrics=report(
            "results/{model}/metrics/{dataset}.json",
            caption="../report/metrics.rst",
            category="3. Metrics in detail",
            subcategory="{model}",
            labels={"model": "{model}", "dataset": "{dataset}"},
        ),
        table=report(
            "results/{model}/metrics/{dataset}_positions.tsv",
            caption="../report/positions.rst",
            category="3. Metrics in detail",
            subcategory="{model}",
            labels={"model": "{model}", "dataset": "{dataset}", "table": "per position"},
        ),
        wells="results/{model}/metrics/{dataset}_wells.tsv",
        plate_map=report(
            "results/{model}/figures/{dataset}_platemap.png",
            caption="../report/platemap.rst",
            category="2. Predictions",
            subcategory="{model}",
            labels={"model": "{model}", "dataset": "{dataset}", "figure": "plate map"},
        ),
    params:
        task=model_task,
        plate_map=plate_map_arg,
    wildcard_constraints:
        dataset=PLATE_DATASET,


rule montage_positions:
    input:
        unpack(montage_positions_inputs),
    output:
        report(
            "results/{model}/figures/{dataset}_montage.png",
            caption="../report/montage.rst",
            category="2. Predictions",
            subcategory="{model}",
            labels={"model": "{model}", "dataset": "{dataset}", "figure": "montage"},
        ),
    params:
        settings=evaluate_settings("ignore_label", "montage_crops", "montage_crop_size"),
        task=model_task,
        channels=dataset_channels,
        paths=montage_position_args,
        title=montage_position_title,
    wildcard_constraints:
        dataset=POSITIONS_DATASET,
    log:
        "logs/montage/{model}/{dataset}.log",
    threads: 1
    resources:
        mem_mb=4000,
        execution=execution_json("evaluate"),
    conda:
        ENV
    shell:
        "unetflow montage {params.paths} --stats {input.stats:q} --task {params.task}"
        " --channels {params.channels:q} --settings {params.settings:q}"
        " --execution {resources.execution:q} --title {params.title:q} --output {output:q}"
        " > {log:q} 2>&1"
