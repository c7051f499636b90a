"""Object finding, append mode, code inputs, the online reference, round seeds and the stage interpreter."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.test_apasi import OTHER_RESPONSES, RESPONSE, TOY_OBJECTS, TOY_TEMPLATES, FakeCompleter, toy_objects_of
from tests.test_pipeline import TINY, job_counts, snakemake

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
BIN = Path(sys.executable).parent


def stage_code():
    """workflow/stage_code.py, the module common.smk's code() and PYTHON come from."""
    spec = importlib.util.spec_from_file_location("stage_code", ROOT / "workflow" / "stage_code.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relative(paths: list[str], src: Path = SRC) -> list[str]:
    return [str(Path(p).relative_to(src)) for p in paths]


# ---------------------------------------------------------------------------------------------------------------
# One object finder for APASI, SENTINEL and CHAIR


@pytest.mark.parametrize("compounds, expected", [("coco", {"car"}), ("vocabulary", {"football", "car"})])
def test_apasi_finds_the_objects_chair_counts(tmp_path, compounds, expected):
    """'soccer ball' is a compound of the vocabulary, not of CHAIR's COCO list: with data.compounds=coco CHAIR finds
    no football in it, and neither may the pairs."""
    from halludpo.evaluate import chair_scorer, object_scorer
    from halludpo.pairs import object_finder

    vocabulary = tmp_path / "vocabulary.txt"
    vocabulary.write_text("football, soccer ball\ncar, car\n")
    cfg = OmegaConf.create({"data": {"vocabulary": str(vocabulary), "compounds": compounds},
                            "eval": {"chair": {"text_pipeline": "offline"}}})
    text = "a soccer ball lies next to a car ."
    objects_of, categories = object_finder(cfg)
    assert objects_of(text) == set(chair_scorer(vocabulary, compounds, "offline").categories(text)) == expected
    assert set(object_scorer(cfg).categories(text)) == expected  # SENTINEL's and the metric's scorer
    assert categories == ["car", "football"]


def test_pairs_build_no_scorer_of_their_own():
    source = (SRC / "halludpo" / "pairs.py").read_text()
    assert "for_vocabulary" not in source and "ChairScorer(" not in source and "chair_scorer(" not in source


# ---------------------------------------------------------------------------------------------------------------
# method.mode=append, whatever the rate


def _generations():
    return [{"image_id": i, "image_path": f"img/{i}.png", "prompt": "describe this image .", "response": r,
             "model": "toy-0", "round": 0, "sampling": {}} for i, r in enumerate([RESPONSE, *OTHER_RESPONSES])]


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.9])
def test_append_mode_injects_whatever_the_rate(rate):
    """At rate 0 no sentence would be replaced, at 0.9 all but none: append ignores the rate, one sentence each."""
    rows, stats = build_pairs(rate, "append")
    assert stats["skipped_rate"] == 0 and stats["pairs"] == len(_generations()) == len(rows)
    for row in rows:
        assert row["rejected"].startswith(row["chosen"].rstrip()) and len(row["meta"]["inserted_indices"]) == 1


def test_append_mode_still_needs_a_sentence_past_skip():
    rows, stats = build_pairs(0.0, "append", skip=3)  # OTHER_RESPONSES have 2-3 sentences
    assert stats["skipped_rate"] == 4 and len(rows) == 1


def test_other_modes_still_follow_the_rate():
    _, stats = build_pairs(0.0, "replace")
    assert stats["skipped_rate"] == len(_generations()) and stats["pairs"] == 0


def build_pairs(rate, mode, skip=1):
    from halludpo.apasi import build_apasi_pairs

    return build_apasi_pairs(_generations(), toy_objects_of, TOY_OBJECTS, FakeCompleter(), rate, skip, mode,
                             TOY_TEMPLATES, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Code inputs: the modules a stage imports, transitively


def test_code_inputs_follow_imports_transitively():
    sources = stage_code().module_sources
    evaluate = relative(sources("halludpo.evaluate", SRC))
    assert {"halludpo/evaluate.py", "halludpo/metrics/pope.py", "halludpo/metrics/chair.py", "halludpo/inference.py",
            "halludpo/models.py", "halludpo/__init__.py", "halludpo/metrics/__init__.py"} <= set(evaluate)
    assert evaluate == sorted(evaluate) and "halludpo/train.py" not in evaluate
    generate = relative(sources("halludpo.generate", SRC))
    assert {"halludpo/generate.py", "halludpo/inference.py", "halludpo/models.py"} <= set(generate)
    pairs = relative(sources("halludpo.pairs", SRC))  # lazy imports inside functions count too
    assert {"halludpo/sentinel.py", "halludpo/verifiers.py", "halludpo/detectors.py", "halludpo/evaluate.py",
            "halludpo/metrics/pope.py"} <= set(pairs)


def test_code_inputs_resolve_relative_imports_and_skip_other_packages(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import leaf\n")
    (package / "sub" / "leaf.py").write_text("import json\nfrom ..util import helper\n")
    (package / "util.py").write_text("def helper():\n    import pkg.late\n")
    (package / "late.py").write_text("")
    (package / "main.py").write_text("import os\nfrom pkg.sub import leaf\n")
    (package / "unused.py").write_text("")
    found = relative(stage_code().module_sources("pkg.main", tmp_path), tmp_path)
    assert found == ["pkg/__init__.py", "pkg/late.py", "pkg/main.py", "pkg/sub/__init__.py", "pkg/sub/leaf.py",
                     "pkg/util.py"]
    with pytest.raises(ValueError, match="no source file"):
        stage_code().module_sources("pkg.missing", tmp_path)


def test_every_rule_derives_its_code_inputs():
    """No rule file of the stages lists its code by hand: every `code=` input is code(<stage module>)."""
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        if smk.name in ("report.smk", "verify.smk"):
            continue
        for line in smk.read_text().splitlines():
            if line.strip().startswith("code="):
                assert re.fullmatch(r'\s*code=code\("\w+"\),', line), f"{smk.name}: {line.strip()}"


def fake_results(workdir: Path, newer_than: float) -> None:
    """Every output of the tiny DAG as an empty file, all with one mtime after `newer_than` (no run, no provenance:
    only Snakemake's mtime trigger can plan a job)."""
    summary = snakemake(workdir, "--summary", "--rerun-triggers", "mtime")
    assert summary.returncode == 0, summary.stderr[-2000:]
    outputs = [line.split("\t")[0] for line in summary.stdout.splitlines()[1:] if "\t" in line]
    assert any(o.endswith("chair.json") for o in outputs), summary.stdout[:2000]
    for output in outputs:
        path = workdir / output
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os.utime(path, (newer_than + 10, newer_than + 10))


def checkout_copy(tmp_path: Path) -> Path:
    """The workflow and its code copied (mtimes kept), so a test can edit a stage's module."""
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("Snakefile", "workflow", "src", "configs", "envs"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, copy / name)
    return copy


def edit(path: Path, when: float) -> None:
    path.write_text(path.read_text() + "\n# edited\n")
    os.utime(path, (when, when))


def test_editing_an_imported_module_reruns_the_rules_that_run_it(tmp_path, monkeypatch):
    copy = checkout_copy(tmp_path)
    monkeypatch.setattr("tests.test_pipeline.ROOT", copy)  # snakemake() runs the copy's Snakefile
    workdir = tmp_path / "work"
    newest_code = max(p.stat().st_mtime for p in (copy / "src").rglob("*.py"))
    fake_results(workdir, newest_code)
    plan = lambda: snakemake(workdir, "-n", "--rerun-triggers", "mtime")  # noqa: E731
    assert "Nothing to be done" in plan().stdout
    edit(copy / "src" / "halludpo" / "metrics" / "pope.py", newest_code + 20)  # POPE's answer parsing
    jobs = job_counts(plan().stdout)  # + inject (pairs imports the evaluation's scorer) and what follows from it
    assert jobs["evaluate"] == 2 and jobs["pope_questions"] == 1 and jobs["inject"] == 1, jobs
    assert jobs["generate"] == 1 and "pretrain_base" not in jobs, jobs  # only model_1's descriptions
    edit(copy / "src" / "halludpo" / "inference.py", newest_code + 30)  # the decoding code
    jobs = job_counts(plan().stdout)
    assert jobs["generate"] == 3 and jobs["evaluate"] == 2 and "render" not in jobs, jobs  # round 0's too


def test_dry_run_shows_the_derived_code_inputs(tmp_path):
    plan = snakemake(tmp_path, "-n").stdout
    for rule, expected in (("evaluate", ("metrics/pope.py", "inference.py")), ("generate", ("inference.py",))):
        block = plan.split(f"\nrule {rule}:")[1]
        inputs = re.search(r"^\s+input: (.*)$", block, flags=re.M).group(1)
        for name in expected:
            assert f"{SRC}/halludpo/{name}" in inputs, (rule, name, inputs)


# ---------------------------------------------------------------------------------------------------------------
# train.reference=online: no reference_logps in the DAG


def test_online_reference_skips_rule_reference_logps(tmp_path):
    plan = snakemake(tmp_path, "-n", overrides=[*TINY, "train.reference=online"]).stdout
    jobs = job_counts(plan)
    assert "reference_logps" not in jobs and jobs["dpo"] == 1, jobs
    dpo = plan.split("\nrule dpo:")[1]
    inputs = re.search(r"^\s+input: (.*)$", dpo, flags=re.M).group(1)
    assert "round_0/pairs/pairs.jsonl" in inputs and "ref_logps" not in inputs, inputs
    stored = job_counts(snakemake(tmp_path, "-n").stdout)
    assert stored["reference_logps"] == 1


@pytest.mark.slow
def test_online_dpo_trains_on_the_pairs_themselves(tiny_pipeline, tmp_path):
    """Rule dpo with train.reference=online reads pairs.jsonl (no ref_logps) and trains: train.py's online path."""
    base, _ = tiny_pipeline
    workdir = tmp_path / "work"
    shutil.copytree(base, workdir, symlinks=True)
    assert snakemake(workdir, "--touch").returncode == 0  # up to date again if code was edited since it ran
    target = "results/toy_apasi/round_0/train/train_stats.json"
    online = [*TINY, "train.reference=online"]
    assert job_counts(snakemake(workdir, "-n", target, overrides=online).stdout) == {"dpo": 1}
    result = snakemake(workdir, "-p", target, overrides=online)  # a flag first: --config takes the words after it
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads((workdir / target).read_text())
    assert stats["reference"] == "online" and stats["pairs"] > 0 and stats["steps"] >= 1


# ---------------------------------------------------------------------------------------------------------------
# Round seeds: one rule


def test_round_seed_is_one_rule():
    from halludpo.config import round_seed

    cfg = OmegaConf.create({"seed": 7})
    assert [round_seed(cfg, k) for k in range(3)] == [7, 1007, 2007]


def test_no_stage_derives_a_round_seed_itself():
    """`<x>.seed + ...` appears only in halludpo.config.round_seed."""
    offenders = []
    for path in (SRC / "halludpo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and any(
                    isinstance(side, ast.Attribute) and side.attr == "seed" for side in (node.left, node.right)):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == [], offenders


# ---------------------------------------------------------------------------------------------------------------
# The stage interpreter and `make run EXPERIMENT=...`


def test_stage_interpreter_is_snakemakes_unless_conda():
    interpreter = stage_code().stage_interpreter
    assert interpreter("/opt/my env/bin/python3", conda=False) == "'/opt/my env/bin/python3'"
    assert interpreter("/opt/venv/bin/python3", conda=True) == "python"


def no_venv_env() -> dict[str, str]:
    """The environment of a user who runs .venv/bin/snakemake without activating the venv."""
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p).resolve() != BIN.resolve())
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI")}
    return env | {"PATH": path}


def test_stage_commands_name_the_interpreter_running_snakemake(tmp_path):
    interpreter = (BIN / "snakemake").read_text().splitlines()[0].removeprefix("#!")
    cmd = [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--cores", "2",
           "-n", "-p", "--config", f"overrides=[{','.join(TINY)}]"]
    plan = subprocess.run(cmd, capture_output=True, text=True, env=no_venv_env(), timeout=300).stdout
    commands = [c for c in re.findall(r"^Shell command: (.*)$", plan, flags=re.M) if c != "None"]  # rule all
    assert len(commands) >= 10 and all(f" {interpreter} -m halludpo." in c for c in commands), commands[:2]
    assert not any(" python -m" in c for c in commands)


def test_pipeline_runs_without_an_activated_venv(tmp_path):
    """The first rules for real, with the venv's bin directory not on PATH (its `python` is another one or none)."""
    cmd = [str(BIN / "snakemake"), "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--cores", "1",
           "results/data/toy/pope/random.jsonl", "--config", f"overrides=[{','.join(TINY)}]"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=no_venv_env(), timeout=600)
    logs = "".join(p.read_text() for p in (tmp_path / "results" / "logs").glob("*.log"))
    assert result.returncode == 0, logs[-3000:] + result.stderr[-2000:]
    assert "No module named" not in logs
    assert (tmp_path / "results" / "data" / "toy" / "pope" / "random.jsonl").stat().st_size > 0


@pytest.mark.parametrize("experiment, expected", [("toy_sentinel", " --config experiment=toy_sentinel"), ("", "")])
def test_make_run_takes_an_experiment(experiment, expected):
    made = subprocess.run(["make", "--no-print-directory", "-n", "-o", "setup", "run", f"EXPERIMENT={experiment}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == f".venv/bin/snakemake --cores 2{expected}"
