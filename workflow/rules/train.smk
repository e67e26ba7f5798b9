rule train:
    input:
        unpack(train_inputs),
    output:
        best="results/{model}/checkpoint_best.pt",
        last="results/{model}/checkpoint_last.pt",
        log="results/{model}/training_log.csv",
        curve=report(
            "results/{model}/loss_curve.png",
            caption="../report/loss_curve.rst",
            category="Training",
            subcategory="{model}",
        ),
    params:
        model_dir="results/{model}",
        task=model_task,
        model_settings=section_json("model"),
        settings=train_settings_json,
    log:
        "logs/train/{model}.log",
    benchmark:
        "benchmarks/train/{model}.tsv"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=train_gpus,
        execution=execution_json("train"),
    conda:
        ENV
    shell:
        "unetflow train --store {input.store:q} --model-dir {params.model_dir:q}"
        " --task {params.task} --model-settings {params.model_settings:q}"
        " --settings {params.settings:q} --execution {resources.execution:q} --threads {threads}"
        " --best {output.best:q} --last {output.last:q} --log {output.log:q}"
        " --curve {output.curve:q} > {log:q} 2>&1"
