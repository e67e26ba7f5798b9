# Evaluation against baselines, figures, and the report (`snakemake --report report.html`).
# The input/params functions of these rules live here, next to the rules that use them.

report: "../report/workflow.rst"


def evaluate_settings(*keys):
    """A params function: these keys of the model's evaluate section, so editing one reruns
    only the rules that use it; ignore_label falls back to the model's train.ignore_label."""

    def params(wildcards):
        settings = model_section(config, wildcards.model, "evaluate")
        if settings["ignore_label"] is None:
            train = model_section(config, wildcards.model, "train")
            settings["ignore_label"] = train["ignore_label"]
        return as_json({k: settings[k] for k in keys})

    return params


def baseline_path(model):
    return f"results/{model}/baseline_gaussian.json"


def montage_path(model, dataset):
    return f"results/{model}/figures/{dataset}_montage.png"


def evaluation_inputs(wildcards):
    inputs = evaluate_inputs(wildcards)
    if MODELS[wildcards.model]["task"] == "regression":
        inputs["baseline"] = baseline_path(wildcards.model)
    return inputs


def baseline_arg(wildcards, input):
    return f"--baseline {single_quoted(input.baseline)}" if "baseline" in input.keys() else ""


def tune_baseline_inputs(wildcards):
    names = MODELS[wildcards.model]["train_on"]
    return {"images": [DATASETS[d]["image"] for d in names],
            "targets": [DATASETS[d]["target"] for d in names]}


def tune_baseline_datasets(wildcards):
    return as_json([{"name": d, "image": DATASETS[d]["image"], "target": DATASETS[d]["target"],
                     "channels": DATASETS[d]["channels"]}
                    for d in MODELS[wildcards.model]["train_on"]])


def montage_inputs(wildcards):
    return {**evaluate_inputs(wildcards), "stats": stats_path(wildcards.dataset)}


def montage_title(wildcards):
    return f"model {wildcards.model} on dataset {wildcards.dataset}"


def report_figures():
    """Report pages that rule all asks for, so `snakemake --report` finds them all."""
    figures = [montage_path(m, d) for m, d in evaluated_pairs()]
    return figures + ["results/summary.html", "results/comparison.png"]


rule tune_baseline:
    input:
        unpack(tune_baseline_inputs),
    output:
        "results/{model}/baseline_gaussian.json",
    params:
        datasets=tune_baseline_datasets,
        settings=evaluate_settings("gaussian_sigmas", "tuning_crops", "tuning_crop_size"),
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
        report(
            "results/{model}/metrics/{dataset}.json",
            caption="../report/metrics.rst",
            category="3. Metrics in detail",
            subcategory="{model}",
            labels={"model": "{model}", "dataset": "{dataset}"},
        ),
    params:
        settings=evaluate_settings("ignore_label", "iou_threshold"),
        task=model_task,
        num_classes=num_classes,
        channels=dataset_channels,
        baseline=baseline_arg,
    log:
        "logs/evaluate/{model}/{dataset}.log",
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        ENV
    shell:
        "unetflow evaluate --prediction {input.prediction:q} --image {input.image:q}"
        " --target {input.target:q} --task {params.task} --num-classes {params.num_classes}"
        " --channels {params.channels:q} --settings {params.settings:q} {params.baseline}"
        " --model {wildcards.model} --dataset {wildcards.dataset} --output {output:q}"
        " > {log:q} 2>&1"


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
    log:
        "logs/montage/{model}/{dataset}.log",
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        ENV
    shell:
        "unetflow montage --prediction {input.prediction:q} --image {input.image:q}"
        " --target {input.target:q} --stats {input.stats:q} --task {params.task}"
        " --channels {params.channels:q} --settings {params.settings:q}"
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
