rule render:
    """The toy world: images, COCO instances and captions per split, vocabulary."""
    input:
        code=SRC / "toyworld.py",
    output:
        marker=str(paths.data_done(CFG)),
        train=CFG.data.train_instances,
        captions=CFG.data.train_captions,
        gen=CFG.data.gen_instances,
        eval=CFG.data.eval_instances,
        vocabulary=CFG.data.vocabulary,
    params:
        config=subtree("data"),
    conda:
        CONDA_ENV
    log:
        RESULTS / "logs" / f"render_{CFG.data.name}.log",
    shell:
        stage("data", "render") + " > {log} 2>&1"
