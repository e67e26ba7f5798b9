# Evaluation against baselines, figures, and the report (`snakemake --report report.html`).


report: "../report/workflow.rst"


rule tune_baseline:
    input:
        unpack(tune_baseline_inputs),
    output:
        "results/{model}/baselines.json",
    params:
        datasets=tune_baseline_datasets,
        settings=evaluate_settings(
            "baselines",
            "gaussian_sigmas",
            "tv_weights",
            "nlm_strengths",
            "tuning_crops",
            "tuning_crop_size",
        ),
    log:
        "logs/tune_baseline/{model}.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "unetflow tune-baseline --datasets {params.datasets:q} --settings {params.settings:q}"
        " --output {output:q} > {log:q} 2>&1"


rule evaluate:
    input:
        unpack(evaluation_inputs),
    output:
        metrics=report(
            "results/{model}/metrics/{dataset}.json",
            caption="../report/metrics.rst",
            category="3. Metrics in detail",
            subcategory="{model}",
            labels={"model": "{model}", "dataset": "{dataset}"},
        ),
        crops="results/{model}/metrics/{dataset}.crops.tsv",
    params:
        settings=evaluate_settings("ignore_label", "iou_threshold", "montage_crop_size"),
        task=model_task,
        num_classes=num_classes,
        channels=dataset_channels,
        baseline=baseline_arg,
    wildcard_constraints:
        dataset=IMAGE_DATASET,
    log:
        "logs/evaluate/{model}/{dataset}.log",
    threads: 1
    resources:
        mem_mb=4000,
        execution=execution_json("evaluate"),
    conda:
        ENV
    shell:
        "unetflow evaluate --prediction {input.prediction:q} --image {input.image:q}"
        " --target {input.target:q} --task {params.task} --num-classes {params.num_classes}"
        " --channels {params.channels:q} --settings {params.settings:q} {params.baseline}"
        " --execution {resources.execution:q} --model {wildcards.model}"
        " --dataset {wildcards.dataset} --checkpoint {input.checkpoint:q}"
        " --output {output.metrics:q}"
        " --crop-scores {output.crops:q} --threads {threads} > {log:q} 2>&1"


rule montage:
    input:
        unpack(montage_inputs),
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
        title=montage_title,
    wildcard_constraints:
        dataset=IMAGE_DATASET,
    log:
        "logs/montage/{model}/{dataset}.log",
    threads: 1
    resources:
        mem_mb=4000,
        execution=execution_json("evaluate"),
    conda:
        ENV
    shell:
        "unetflow montage --prediction {input.prediction:q} --image {input.image:q}"
        " --target {input.target:q} --stats {input.stats:q} --task {params.task}"
        " --channels {params.channels:q} --settings {params.settings:q}"
        " --crop-scores {input.crop_scores:q} --execution {resources.execution:q}"
        " --threads {threads}"
        " --title {params.title:q} --output {output:q} > {log:q} 2>&1"


rule summarize:
    input:
        all_metrics,
    output:
        tsv=report(
            "results/summary.tsv",
            caption="../report/summary.rst",
            category="1. Summary",
            labels={"result": "table of all scores (TSV)"},
        ),
        html=report(
            "results/summary.html",
            caption="../report/summary.rst",
            category="1. Summary",
            labels={"result": "table of all scores"},
        ),
    log:
        "logs/summarize.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        ENV
    shell:
        "unetflow summarize --output {output.tsv:q} --html {output.html:q} {input:q}"
        " > {log:q} 2>&1"


rule compare:
    input:
        "results/summary.tsv",
    output:
        report(
            "results/comparison.png",
            caption="../report/comparison.rst",
            category="1. Summary",
            labels={"result": "models against baselines"},
        ),
    log:
        "logs/compare.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        ENV
    shell:
        "unetflow compare --summary {input:q} --output {output:q} > {log:q} 2>&1"
