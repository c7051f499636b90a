# Public datasets by URL and checksum (configs/download/default.yaml, halludpo.download),
# config group `download` in configs/config.yaml's defaults list.
# Nothing here is part of the default target. A rule that reads real data takes the markers as input:
#     input: download.marker_paths(CFG.download, ["coco2014_val"])    # entries or bundles
# (after `from halludpo import download`).
import re

DOWNLOAD_ENTRIES = to_plain(CFG.download.entries)


rule download:
    """One entry of configs/download/: fetched by URL with a resumable transfer (a rerun continues a cut one),
    checked by checksum, an archive unpacked beside itself under download.root. With download.offline=true the
    file must already be there and is only checked. The output is a JSON marker naming the file or folder.
    An entry without a checksum fails with a message saying how to fill it in, unless it says verify: tofu (trust
    on first use: the first download's sha256 is recorded in download.lock_dir and checked on every later run).
        snakemake --cores 2 results/downloads/done/coco2014_val_images.json
        snakemake --cores 2 <marker> --config overrides="[download.offline=true,download.root=/data/public]"
    Runs on the submitting host (localrule): compute nodes of many clusters have no internet.
    """
    output:
        marker=f"{CFG.download.done_dir}/{{name}}.json",
    params:
        entry=lambda wildcards: json.dumps(DOWNLOAD_ENTRIES[wildcards.name], sort_keys=True),
    wildcard_constraints:
        name="|".join(re.escape(name) for name in DOWNLOAD_ENTRIES),
    localrule: True
    conda:
        CONDA_ENV
    log:
        RESULTS / "logs" / "download_{name}.log",
    shell:
        stage("download", "download_{wildcards.name}") + " 'download.names=[{wildcards.name}]' > {log} 2>&1"
