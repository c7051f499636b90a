# Config composition, validation and helpers (no rules). The Hydra config composed here is the one every stage
# composes again from the same overrides, so the DAG and the stages agree.
import json
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from omegaconf import OmegaConf
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))
from stage_code import module_sources, stage_interpreter
from halludpo import determinism, paths, shards
from halludpo.config import ConfigError, compose, normalize_overrides, to_plain

validate(config, schema="../schemas/snakemake_config.schema.yaml")

OVERRIDES = normalize_overrides(config.get("overrides"))
if config.get("experiment"):
    OVERRIDES = [f"experiment={config['experiment']}"] + OVERRIDES
try:
    CFG = compose(OVERRIDES)
except ConfigError as err:
    # SystemExit: Snakemake prints the message alone, without a WorkflowError header and a traceback line
    raise SystemExit(f"invalid config: {err}") from None

SRC = Path(workflow.basedir) / "src" / "halludpo"
CONDA_ENV = "../../envs/halludpo.yaml"  # relative to the rule files
GPU_ENV = "../../envs/halludpo-gpu.yaml"  # + DeepSpeed (pyproject.toml's `gpu` extra): rule dpo with train.deepspeed
RESULTS = Path(CFG.paths.results)
EXP = Path(CFG.paths.experiment_dir)
ROUNDS = list(range(CFG.rounds + 1))


# The user's overrides reach the stages through these globals, which rule shell commands name as {OVERRIDE_ARGS}
# etc.: Snakemake formats globals into shell commands but does not track them, so an override changes only the
# rules whose `params.config` (the config values they depend on) changes. A command in `params` would rerun every
# rule, the shared toy world and base model included, whenever any override changed.
OVERRIDE_ARGS = " ".join(shlex.quote(o) for o in OVERRIDES)
HYDRA_DIR = shlex.quote(f"{RESULTS}/hydra/{CFG.experiment_name}")
SRC_PATH = shlex.quote(str(SRC.parent))
# Every stage command's environment (a shell template: Snakemake fills in SRC_PATH). src/ goes on the path: the rules
# run the checkout's code, also inside a conda env without the package. Fixed thread counts: MKL/OpenMP may
# otherwise use fewer threads on a busy node, which changes float reduction order and so the trained weights.
# The CPU kernel levels are pinned (halludpo.determinism): the same model_0 under any kernel level on one CPU vendor.
# Progress bars refresh at most every 30 s: rule logs are files, where each refresh would be another line.
STAGE_ENV = (determinism.shell_exports() + " MKL_DYNAMIC=FALSE OMP_DYNAMIC=FALSE TQDM_MININTERVAL=30 "
             "PYTHONPATH={SRC_PATH}${{PYTHONPATH:+:$PYTHONPATH}}")


def uses_conda():
    """Snakemake runs the rules in their conda envs (--sdm conda, --use-conda); spawned jobs (SLURM) get the same
    deployment method on their command line, so they agree."""
    settings = getattr(workflow, "deployment_settings", None)
    return settings is not None and DeploymentMethod.CONDA in settings.deployment_method


# The stage commands' interpreter (shell templates name it {PYTHON}): the one running Snakemake, so
# `.venv/bin/snakemake` works without an activated venv; `python` of the rule's conda env under conda deployment.
PYTHON = stage_interpreter(sys.executable, uses_conda())


def stage(module, rule_name, **settings):
    """Shell command template that runs a stage as a Hydra app with the user's overrides and this rule's settings.

    Setting values may be wildcards ("{wildcards.k}"); the overrides come from OVERRIDE_ARGS at run time, the
    interpreter from PYTHON (a global too, so the command text Snakemake compares does not name a machine's path).
    """
    args = " ".join(f"{k}={v}" for k, v in settings.items())
    run_dir = "{HYDRA_DIR}/" + rule_name + "".join(f"_{k}{v}" for k, v in settings.items())
    return (STAGE_ENV + f" {{PYTHON}} -m halludpo.{module} {args} "
            f"{{OVERRIDE_ARGS}} hydra.run.dir={run_dir} hydra.job.chdir=false")


def code(module):
    """A rule's code input: the .py files stage `halludpo.<module>` runs, its imports followed transitively
    within src/halludpo (workflow/stage_code.py), so editing any of them reruns the rule."""
    return module_sources(f"halludpo.{module}", SRC.parent)


def subtree(*keys):
    """The resolved config values a rule depends on (dotted keys), as one string param: a changed value reruns it."""
    return json.dumps({k: to_plain(OmegaConf.select(CFG, k)) if OmegaConf.is_config(OmegaConf.select(CFG, k))
                       else OmegaConf.select(CFG, k) for k in keys}, sort_keys=True)


def model_marker(wildcards):
    """model_k's marker file (model_0 of a hub id: rule fetch_model's, halludpo.paths.model_marker)."""
    return str(paths.model_marker(CFG, int(wildcards.k)))


wildcard_constraints:
    k=r"\d+",


# Sharded model stages (halludpo.shards): rule <stage> runs shard {i} of {n} (a SLURM job each, on its own GPU);
# a local gather rule concatenates or combines the shard files in order. A finished output keeps the shard files
# it was made from as its inputs, so changing parallel.shards afterwards reruns nothing; the count applies to
# outputs made from then on (delete an output, or --forcerun its rule, to remake it with the new count).
wildcard_constraints:
    i=r"\d+",
    n=r"\d+",


def shard_count(stage_name):
    return int(CFG.parallel.shards[stage_name])


def gathered_shards(final, stage_name, name=None):
    """Input function of a gather rule: the shard files of `final` (a path template with the rule's wildcards)."""

    def shard_inputs(wildcards):
        target = final.format(**wildcards)
        recorded = shards.finished_shard_count(target, name) if Path(target).exists() else None
        return [str(p) for p in shards.shard_files(target, recorded or shard_count(stage_name), name)]

    return shard_inputs


def shard_settings(**settings):
    """A shard job's stage settings: the rule's own plus shard={wildcards.i} shards={wildcards.n}."""
    return settings | {"shard": "{wildcards.i}", "shards": "{wildcards.n}"}
