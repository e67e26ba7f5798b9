rule demo_data:
    output:
        **{name: directory(path) for name, path in demo_store_paths(DEMO_ROOT).items()},
    params:
        settings=as_json(config["demo"]),
        root=demo_output_dir,
    log:
        "logs/demo_data.log",
    threads: 1
    resources:
        mem_mb=2000,
    conda:
        ENV
    shell:
        "unetflow demo-data --output-dir {params.root:q} --settings {params.settings:q} > {log:q} 2>&1"
