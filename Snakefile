# halludpo: self-generated preference data against object hallucination, one DAG.
#   snakemake --cores 2                                              # the default experiment (toy_apasi)
#   snakemake --cores 2 --config overrides="[experiment=toy_apasi,rounds=1]"
from snakemake.utils import min_version

min_version("9.0")

report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/generate.smk"
include: "workflow/rules/verifiers.smk"
include: "workflow/rules/pairs.smk"
include: "workflow/rules/contrast.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/verify.smk"


rule all:
    default_target: True
    input:
        str(paths.summary_json(CFG)),
