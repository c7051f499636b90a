"""conda channels are unreachable here, so the env files are checked against pyproject.toml instead."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pins(lines):
    return dict(re.match(r"([A-Za-z0-9_.-]+)==(\S+)", x).groups() for x in lines if re.match(r"[A-Za-z0-9_.-]+==", x))


def test_conda_envs_pin_the_same_versions_as_pyproject():
    """envs/halludpo.yaml = the dependencies; envs/halludpo-gpu.yaml (GPU nodes) = those + the `gpu` extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base, gpu = pins(project["dependencies"]), pins(project["optional-dependencies"]["gpu"])
    assert base, "pyproject.toml pins nothing"
    assert "deepspeed" in gpu and not set(gpu) & set(base)
    expected = {"halludpo.yaml": base, "halludpo-gpu.yaml": base | gpu}
    envs = sorted((ROOT / "envs").glob("*.yaml"))
    assert sorted(e.name for e in envs) == sorted(expected)
    for env_file in envs:
        env = yaml.safe_load(env_file.read_text())
        pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
        assert pins(pip_section) == expected[env_file.name], env_file.name
        assert "python=3.11" in env["dependencies"]


def test_every_rule_names_an_existing_conda_env():
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        if "rule " not in text:
            continue
        assert text.count("conda:") == len(re.findall(r"^\s*rule \w+:", text, flags=re.M)), smk.name
    assert (ROOT / "workflow" / "rules" / "../../envs/halludpo.yaml").resolve().is_file()
    assert (ROOT / "workflow" / "rules" / "../../envs/halludpo-gpu.yaml").resolve().is_file()  # rule dpo, DeepSpeed


def test_every_dependency_is_pinned_exactly():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in deps["dependencies"] + [d for extra in deps["optional-dependencies"].values() for d in extra]:
        assert "==" in dep, dep
