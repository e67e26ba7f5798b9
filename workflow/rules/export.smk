# A bioimage.io package (model spec 0.5) of each model trained here, after its evaluation:
# rule all asks for them only with export.enabled. Models from a package or a checkpoint
# (no train_on) have no statistics of their own to bake in and are not exported. See
# src/unetflow/export.py and README "Sharing and reusing models (bioimage.io)".


rule export:
    input:
        unpack(export_inputs),
    output:
        "results/{model}/{model}.bioimageio.zip",
    params:
        settings=export_settings,
        args=export_args,
    wildcard_constraints:
        model=TRAINED_MODEL,
    log:
        "logs/export/{model}.log",
    threads: 1
    resources:
        mem_mb=4000,
    conda:
        ENV
    shell:
        "unetflow export --checkpoint {input.checkpoint:q} --image {input.image:q}"
        " {params.args} --settings {params.settings:q} --curve {input.curve:q}"
        " --metrics {input.metrics:q} --model {wildcards.model} --output {output:q}"
        " > {log:q} 2>&1"
