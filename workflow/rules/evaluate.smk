rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        "results/{model}/metrics/{dataset}.json",
    params:
        settings=section_json("evaluate"),
        task=model_task,
        num_classes=num_classes,
        channels=dataset_channels,
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
        " --channels {params.channels:q} --settings {params.settings:q}"
        " --model {wildcards.model} --dataset {wildcards.dataset} --output {output:q}"
        " > {log:q} 2>&1"


rule summarize:
    input:
        all_metrics,
    output:
        report("results/summary.tsv", caption="../report/summary.rst", category="Summary"),
    log:
        "logs/summarize.log",
    threads: 1
    resources:
        mem_mb=1000,
    conda:
        ENV
    shell:
        "unetflow summarize --output {output:q} {input:q} > {log:q} 2>&1"
