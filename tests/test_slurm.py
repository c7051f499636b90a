"""The SLURM profile (workflow/profiles/slurm) and rule dpo's multi-GPU launch.

Dry runs need no cluster. test_toy_pipeline_through_real_slurm starts a real one-node SLURM cluster on localhost
(Debian's slurm-wlm + munge: munged, slurmctld, slurmd with a fake GPU) and runs the tiny toy pipeline through
`snakemake --profile workflow/profiles/slurm`, every job submitted with sbatch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.test_pipeline import TINY

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "workflow" / "profiles" / "slurm"
BIN = Path(sys.executable).parent
# Rules that run a model get a GPU; the others none. Every rule in workflow/rules/ is in exactly one of the sets.
GPU_RULES = {"pretrain_base", "generate", "inject", "sentinel", "contrast_embeddings", "reference_logps", "dpo",
             "pope_answers", "amber_answers", "object_halbench_answers", "mmhal_answers"}
CPU_RULES = {"render", "prepare", "pope_questions", "amber_questions", "object_halbench_questions", "contrast",
             "mix_pairs", "train_verifiers", "merge", "summarize", "compare", "download", "fetch_model", "verify", "evaluate", "gather_generate",
             "inject_pairs", "sentinel_pairs", "gather_reference_logps", "mmhal_judge"}
# Sharded model rules (parallel.shards): one SLURM job per shard; the gather rules run on the submitting host.
SHARDS_3 = ["parallel.shards.generate=3", "parallel.shards.inject=3", "parallel.shards.reference_logps=3",
            "parallel.shards.evaluate=3", "parallel.shards.amber=3"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HALLUDPO_SLURM_", "SLURM_", "SNAKEMAKE_"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env | {"PATH": f"{BIN}:{env['PATH']}"} | extra


def snakemake(workdir: Path, *args: str, overrides=TINY, env=None, timeout=600) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--config", f"overrides=[{','.join(overrides)}]", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or clean_env(), timeout=timeout, cwd=workdir)


def planned_jobs(stdout: str) -> dict[str, list[dict]]:
    """A dry run's printout (-p) -> {rule: [{"resources": {name: value}, "shell": command}, ...]}."""
    jobs: dict[str, list[dict]] = {}
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", stdout):
        rule = re.search(r"^(?:local)?rule (\w+):", block, flags=re.M)
        if not rule:
            continue
        resources = re.search(r"^\s+resources: (.*)$", block, flags=re.M)
        shell = re.search(r"^Shell command: (.*)$", block, flags=re.M)
        jobs.setdefault(rule.group(1), []).append({
            "resources": dict(item.split("=", 1) for item in resources.group(1).split(", ")) if resources else {},
            "shell": shell.group(1) if shell else "",
        })
    return jobs


def test_every_rule_is_classified_gpu_or_cpu():
    rules = set()
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        rules |= set(re.findall(r"^\s*rule (\w+):", smk.read_text(), flags=re.M))
    assert rules == GPU_RULES | CPU_RULES, rules ^ (GPU_RULES | CPU_RULES)
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["slurm-status-command"] == "squeue"
    assert profile["retries"] >= 1
    assert set(profile["set-resources"]) >= GPU_RULES
    for rule, res in profile["set-resources"].items():
        assert ("gpu" in res) == (rule in GPU_RULES), rule
        assert {"mem_mb", "runtime", "cpus_per_task"} <= res.keys(), rule
        if rule in GPU_RULES:  # threads = cpus_per_task, and every `threads: workflow.cores` rule is set
            assert profile["set-threads"][rule] == res["cpus_per_task"], rule
            assert "slurm_partition" in res, rule
    assert "gpu" not in profile["default-resources"]


@pytest.mark.parametrize("experiment", ["toy_apasi", "toy_apasi_sentinel", "toy_symmpo"])
def test_profile_dry_run_gives_gpus_to_model_rules_only(tmp_path, experiment):
    env = clean_env(HALLUDPO_SLURM_ACCOUNT="proj_x", HALLUDPO_SLURM_PARTITION="cpu_q")
    every_benchmark = ["eval.benchmarks=[chair,pope,amber,object_halbench]"] if experiment == "toy_apasi" else []
    plan = snakemake(tmp_path, "-n", "-p", "--profile", str(PROFILE),
                     overrides=[f"experiment={experiment}"] + every_benchmark, env=env)
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs = planned_jobs(plan.stdout)
    expected = {"toy_apasi": {"render", "pretrain_base", "generate", "inject", "reference_logps", "dpo", "merge",
                              "evaluate", "pope_questions", "pope_answers", "amber_questions", "amber_answers",
                              "object_halbench_questions", "object_halbench_answers", "summarize"},
                "toy_apasi_sentinel": {"inject", "sentinel", "mix_pairs", "train_verifiers"},
                "toy_symmpo": {"contrast_embeddings", "contrast"}}[experiment]
    assert expected <= jobs.keys(), jobs.keys()
    for rule, planned in jobs.items():
        if rule == "all":
            continue
        for job in planned:
            res = job["resources"]
            assert res["slurm_account"] == "proj_x", (rule, res)
            if rule in GPU_RULES:
                assert res["gpu"] == "1" and res["slurm_partition"] == "gpu" and res["cpus_per_task"] == "8", res
                assert job["shell"].startswith("OMP_NUM_THREADS=8 "), job["shell"]
            else:
                assert rule in CPU_RULES, rule
                assert "gpu" not in res and "gres" not in res, (rule, res)
                assert res["slurm_partition"] == "cpu_q", (rule, res)
    dpo = jobs["dpo"][0]["shell"]
    assert " -m halludpo.train round=0 step=dpo " in dpo and "accelerate" not in dpo


def test_make_slurm_profile_installs_the_user_profile(tmp_path):
    """`make slurm-profile`, then literally `snakemake --profile slurm` (found in $XDG_CONFIG_HOME/snakemake)."""
    config_home = tmp_path / "config"
    env = clean_env(XDG_CONFIG_HOME=str(config_home))
    for _ in range(2):  # a second install keeps an edited copy as .bak
        made = subprocess.run(["make", "-o", "setup", "slurm-profile"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        installed = config_home / "snakemake" / "slurm" / "config.yaml"
        assert installed.read_text() == (PROFILE / "config.yaml").read_text()
        installed.write_text(installed.read_text().replace("jobs: 20", "jobs: 5"))
    assert "jobs: 5" in (installed.parent / "config.yaml.bak").read_text()
    work = tmp_path / "work"
    work.mkdir()
    plan = snakemake(work, "-n", "--profile", "slurm", env=env)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "Using profile slurm" in plan.stdout + plan.stderr
    assert planned_jobs(plan.stdout)["dpo"][0]["resources"]["gpu"] == "1"


def test_dpo_on_one_gpu_or_cpu_keeps_its_command(tmp_path):
    """The command text of rule dpo is what Snakemake compares to decide reruns: unchanged unless dpo has > 1 GPU."""
    local = planned_jobs(snakemake(tmp_path, "-n", "-p", "--cores", "2").stdout)["dpo"][0]["shell"]
    assert re.fullmatch(r"OMP_NUM_THREADS=2 (\S+=\S+ )*MKL_DYNAMIC=FALSE OMP_DYNAMIC=FALSE TQDM_MININTERVAL=30 "
                        r"PYTHONPATH=\S+ exec \S*python\S* -m "
                        r"halludpo\.train round=0 step=dpo \S.* hydra\.run\.dir=\S+/dpo_round0_stepdpo "
                        r"hydra\.job\.chdir=false > \S+/dpo_r0\.log 2>&1", local), local
    one = planned_jobs(snakemake(tmp_path, "-n", "-p", "--cores", "2", "--set-resources", "dpo:gpu=1").stdout)
    assert one["dpo"][0]["shell"] == local


def test_dpo_on_several_gpus_launches_accelerate(tmp_path):
    env = clean_env(HALLUDPO_SLURM_DPO_GPUS="4")
    plan = snakemake(tmp_path, "-n", "-p", "--profile", str(PROFILE), env=env)
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs = planned_jobs(plan.stdout)
    dpo = jobs["dpo"][0]
    assert dpo["resources"]["gpu"] == "4"
    assert re.match(r"OMP_NUM_THREADS=\$\(\( \(8 \+ 4 - 1\) / 4 \)\) (\S+=\S+ )*MKL_DYNAMIC=FALSE .* "
                    r"exec \S*python\S* -m accelerate\.commands\.launch "
                    r"--config_file \S+/configs/accelerate/multi_gpu\.yaml --num_processes 4 "
                    r"--main_process_port \$\(\(29500 \+ \$\{SLURM_JOB_ID:-0\} % 20000\)\) -m halludpo\.train "
                    r"round=0 step=dpo ", dpo["shell"]), dpo["shell"]
    assert all("accelerate" not in job["shell"] for rule in jobs if rule != "dpo" for job in jobs[rule])
    # without the profile too: --set-resources dpo:gpu=N on a multi-GPU workstation
    plan = snakemake(tmp_path, "-n", "-p", "--cores", "8", "--set-resources", "dpo:gpu=2")
    assert "--num_processes 2 " in planned_jobs(plan.stdout)["dpo"][0]["shell"]


def test_accelerate_and_deepspeed_configs_load(tmp_path):
    """The accelerate config parses as accelerate's own; every "auto" of the ZeRO configs is filled by the
    installed transformers' Trainer logic (HfTrainerDeepSpeedConfig's methods, run without the deepspeed package,
    which only CUDA machines install)."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    launch = load_config_from_file(str(ROOT / "configs" / "accelerate" / "multi_gpu.yaml"))
    assert launch.distributed_type == DistributedType.MULTI_GPU and launch.num_machines == 1

    methods = {k: v for k, v in vars(HfTrainerDeepSpeedConfig).items() if not k.startswith("__")}
    TrainerDeepSpeedConfig = type("TrainerDeepSpeedConfig", (HfDeepSpeedConfig,), methods)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             learning_rate=3e-5, max_grad_norm=1.0, use_cpu=True, report_to="none")
    model = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(hidden_size=64)))
    for stage in (2, 3):
        ds = TrainerDeepSpeedConfig(str(ROOT / "configs" / "deepspeed" / f"zero{stage}.json"))
        ds.mismatches, ds._dtype = [], None
        ds.trainer_config_process(args)
        ds.trainer_config_finalize(args, model, num_training_steps=10)
        assert "auto" not in json.dumps(ds.config), ds.config
        assert ds.config["zero_optimization"]["stage"] == stage
        assert ds.config["train_batch_size"] == 8 and ds.config["train_micro_batch_size_per_gpu"] == 4
    assert ds.config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


# ---------------------------------------------------------------------------------------------------------------
# A real one-node SLURM cluster

SLURM_BINARIES = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "sbatch", "squeue", "scontrol",
                  "sinfo")
RUN_CONF = Path("/run/slurm/conf/slurm.conf")
CONF_MARK = "# written by halludpo's tests/test_slurm.py"
INSTALL_HINT = ("needs root and Debian's SLURM + MUNGE: `make slurm-deps` (= apt-get install -y "
                "--no-install-recommends slurm-wlm munge)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(d: Path, ctld_port: int, slurmd_port: int) -> str:
    # SlurmdParameters=config_overrides: the node is what this file says, not what slurmd detects, so the profile's
    # real memory requests fit (memory is not enforced here: no cgroups). CPUs are the real two.
    return f"""\
{CONF_MARK}
ClusterName=halludpotest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
GresTypes=gpu
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=131072 Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        return cred.returncode == 0 and subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                                                       timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def wait_for(what: str, check, timeout: float, logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in logs if p.exists())
    raise AssertionError(f"{what}: not within {timeout:.0f} s\n{tails}")


def stop_pid(pid: int, timeout: float = 15) -> None:
    """SIGTERM one process we started, by its id; SIGKILL if it is still there after timeout."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return  # exited; its parent (us, for Popen) reaps it
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def one_node_cluster(d: Path):
    """munged (unless one already answers), slurmctld and slurmd on localhost with their own config, ports and state
    under d; all stopped by PID on exit. Yields the environment that points SLURM's clients at it (SLURM_CONF)."""
    for sub in ("state", "spool"):
        (d / sub).mkdir(exist_ok=True)
    (d / "slurm.conf").write_text(slurm_conf(d, free_port(), free_port()))
    (d / "gres.conf").write_text("NodeName=localhost Name=gpu File=/dev/null\n")  # a fake GPU
    env = clean_env(SLURM_CONF=str(d / "slurm.conf"))
    started: list[int] = []
    daemons: list[subprocess.Popen] = []
    # The srun inside each job does not see SLURM_CONF (snakemake-executor-plugin-slurm-jobstep strips SLURM_*
    # variables from it), so it finds the config where SLURM's clients look next: /etc/slurm/slurm.conf (absent
    # here, see the fixture), then /run/slurm/conf/slurm.conf -- a copy there for the cluster's lifetime.
    RUN_CONF.parent.mkdir(parents=True, exist_ok=True)
    RUN_CONF.write_text((d / "slurm.conf").read_text())
    try:
        if not munge_works():
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, timeout=30)
            wait_for("munged", munge_works, 15)
            started.append(int(Path("/run/munge/munged.pid").read_text()))
        for name, argv in (("slurmctld", ["/usr/sbin/slurmctld", "-D", "-c", "-f", str(d / "slurm.conf")]),
                           ("slurmd", ["/usr/sbin/slurmd", "-D", "-N", "localhost", "-f", str(d / "slurm.conf")])):
            with open(d / f"{name}.out", "w") as out:
                daemons.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True))
            if name == "slurmctld":
                wait_for("slurmctld answers", lambda: subprocess.run(["scontrol", "ping"], env=env,
                                                                     capture_output=True).returncode == 0,
                         30, [d / "slurmctld.log", d / "slurmctld.out"])

        def node_idle():
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True)
            return state.stdout.split() == ["localhost", "idle"]

        wait_for("sinfo shows localhost idle", node_idle, 60,
                 [d / "slurmctld.log", d / "slurmd.log", d / "slurmd.out"])
        yield env
    finally:
        if daemons and daemons[0].poll() is None:  # jobs still queued or running after a failure
            subprocess.run(["scancel", "--user", "root", "--full"], env=env, capture_output=True, timeout=30)
            time.sleep(2)
        for proc in reversed(daemons):
            stop_pid(proc.pid)
            proc.wait(timeout=30)
        for pid in started:
            stop_pid(pid)
        RUN_CONF.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    missing = [b for b in SLURM_BINARIES if not (Path(b).is_file() if b.startswith("/") else shutil.which(b))]
    if missing:
        pytest.skip(f"SLURM binaries missing ({', '.join(missing)}): {INSTALL_HINT}")
    if os.geteuid() != 0:
        pytest.skip(f"not root: {INSTALL_HINT}")
    for conf in (Path("/etc/slurm/slurm.conf"), RUN_CONF):
        if conf.exists() and not conf.read_text().startswith(CONF_MARK):  # ours: left by a killed run
            pytest.skip(f"{conf} exists: this machine belongs to a SLURM cluster already; the test builds its own")
    d = tmp_path_factory.mktemp("slurm")
    with one_node_cluster(d) as env:
        yield SimpleNamespace(dir=d, env=env)


@pytest.mark.slow
@pytest.mark.slurm
def test_toy_pipeline_through_real_slurm(slurm_cluster, tiny_pipeline, tmp_path):
    """The tiny toy pipeline (base + 1 round) to summary.json, every job through sbatch: the shipped profile with
    this cluster's partition, one CPU per GPU job, and short waits on the command line. The model stages run as
    3 shards each (3 sbatch jobs), and summary.json is the unsharded local run's byte for byte."""
    env = slurm_cluster.env | {"HALLUDPO_SLURM_PARTITION": "debug", "HALLUDPO_SLURM_GPU_PARTITION": "debug",
                               "HALLUDPO_SLURM_GPU_CPUS": "1"}
    started = time.monotonic()
    run = snakemake(tmp_path, "--profile", str(PROFILE), "--jobs", "2", "--retries", "0",
                    "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5",
                    "--slurm-keep-successful-logs", env=env, timeout=1200, overrides=TINY + SHARDS_3)
    wall = time.monotonic() - started
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-5000:])

    summary = json.loads((tmp_path / "results" / "toy_apasi" / "summary.json").read_text())
    assert [row["round"] for row in summary["rounds"]] == [0, 1]
    for row in summary["rounds"]:
        assert all(0.0 <= row["chair"][k] <= 1.0 for k in ("chair_s", "chair_i", "recall")), row["chair"]
        assert all(0.0 <= split["f1"] <= 1.0 for split in row["pope"].values()), row["pope"]
    assert summary["rounds"][0]["train"]["pairs"] > 0
    base, _ = tiny_pipeline  # the same config without shards, run locally
    for name in ("summary.json", "round_0/eval/amber.json", "round_1/eval/lmms_eval/results.json"):
        assert (tmp_path / "results" / "toy_apasi" / name).read_bytes() == (
            base / "results" / "toy_apasi" / name).read_bytes(), name

    # every rule ran as a SLURM job: slurmctld still holds the finished jobs (MinJobAge=3600: a run on a busy
    # machine takes more than 10 minutes)
    shown = subprocess.run(["scontrol", "-o", "show", "job"], env=env, capture_output=True, text=True, check=True)
    jobs = {}
    for line in shown.stdout.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        jobs.setdefault(re.sub(r"_wildcards_.*", "", fields.get("Comment", "")).removeprefix("rule_"),
                        []).append(fields)
    expected = {"render": 1, "pope_questions": 1, "amber_questions": 1, "pretrain_base": 1, "generate": 9,
                "pope_answers": 6, "amber_answers": 6, "evaluate": 2, "inject": 3, "inject_pairs": 1,
                "reference_logps": 3, "dpo": 1, "merge": 1, "summarize": 1}
    assert {rule: len(v) for rule, v in jobs.items()} == expected, jobs.keys()
    for rule, fields in jobs.items():
        for job in fields:
            assert job["JobState"] == "COMPLETED" and job["Partition"] == "debug", (rule, job)
            # --gpus=1 (resource gpu: 1) shows as TresPerJob; TRES lists only what accounting tracks
            assert (job.get("TresPerJob") == "gres:gpu:1") == (rule in GPU_RULES), (rule, job.get("TresPerJob"))
    dpo_id = jobs["dpo"][0]["JobId"]
    assert list((tmp_path / ".snakemake" / "slurm_logs" / "rule_dpo").rglob(f"{dpo_id}.log"))
    assert f"JobId={dpo_id}" in (slurm_cluster.dir / "slurmctld.log").read_text()
    print(f"toy pipeline through SLURM: {sum(map(len, jobs.values()))} jobs, {wall:.0f} s")
