# The data set every stage reads (configs/data/: the same keys for every data config, checked against
# workflow/schemas/data_config.schema.yaml). One rule writes it, by data.kind:
#   toy   rule render   the procedural toy world, rendered from scratch
#   coco  rule prepare  real COCO data from the download markers (rule download): gen / eval splits, vocabulary,
#                       CHAIR's image list, POPE's released question files
from halludpo import download

validate(to_plain(CFG.data), schema="../schemas/data_config.schema.yaml", set_default=False)

if CFG.data.kind == "toy":

    rule render:
        """The toy world: images, COCO instances and captions per split, vocabulary."""
        input:
            code=code("data"),
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

elif CFG.data.kind == "coco":

    rule prepare:
        """COCO: detail-23k's COCO 2017 train images (+ their prompts) as the gen split; OPERA's 500 val2014 images
        with their instances and captions as the eval split; POPE's released question files; COCO synonyms."""
        input:
            code=code("data"),
            downloads=download.marker_paths(CFG.download, CFG.data.downloads),
        output:
            marker=str(paths.data_done(CFG)),
            gen=CFG.data.gen_instances,
            eval=CFG.data.eval_instances,
            captions=CFG.data.eval_captions,
            vocabulary=CFG.data.vocabulary,
            chair_image_ids=str(paths.chair_image_ids(CFG)),
            pope=[str(paths.pope_questions(CFG, s)) for s in CFG.eval.pope.splits],
        params:
            config=subtree("data", "eval.pope.splits"),
        conda:
            CONDA_ENV
        log:
            RESULTS / "logs" / f"prepare_{CFG.data.name}.log",
        shell:
            stage("data", "prepare") + " > {log} 2>&1"

else:
    raise WorkflowError(f"data.kind={CFG.data.kind!r}: no rule writes it (known: toy, coco)")
