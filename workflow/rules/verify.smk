# Integrity of what the stages wrote: every stage run lists its files with their sha256 in a manifest
# (halludpo.manifest: results/<experiment>/manifests/, shared stages in results/manifests/). Not part of the
# default target; ask for it after a run, or before trusting old results:
#     snakemake --cores 1 verify                        # the default experiment
#     snakemake --cores 1 verify --config experiment=toy_mdpo


rule verify:
    """Hash every file of the experiment's manifests (and the shared ones of its data, base model, verifiers,
    downloads) again: one line per file that is missing, truncated or changed, and the rule fails if there is one.
    No outputs: it runs whenever it is asked for. Same as `python -m halludpo.verify results/<experiment>`."""
    localrule: True
    conda:
        CONDA_ENV
    shell:
        # the stages' interpreter ({PYTHON}) where common.smk defines it, else `python` of the environment
        STAGE_ENV + (" {PYTHON}" if "PYTHON" in globals() else " python") + " -m halludpo.verify {EXP:q}"
