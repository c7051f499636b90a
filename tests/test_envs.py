"""conda channels are unreachable here, so the env files are checked against pyproject.toml instead."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pins(lines):
    return dict(re.match(r"([A-Za-z0-9_.-]+)==(\S+)", x).groups() for x in lines if re.match(r"[A-Za-z0-9_.-]+==", x))


def test_conda_envs_pin_the_same_versions_as_pyproject():
    project = pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert project, "pyproject.toml pins nothing"
    envs = sorted((ROOT / "envs").glob("*.yaml"))
    assert envs
    for env_file in envs:
        env = yaml.safe_load(env_file.read_text())
        pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
        assert pins(pip_section) == project, env_file.name
        assert "python=3.11" in env["dependencies"]


def test_every_rule_names_an_existing_conda_env():
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        if "rule " not in text:
            continue
        assert text.count("conda:") == len(re.findall(r"^\s*rule \w+:", text, flags=re.M)), smk.name
    assert (ROOT / "workflow" / "rules" / "../../envs/halludpo.yaml").resolve().is_file()


def test_every_dependency_is_pinned_exactly():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in deps["dependencies"] + deps["optional-dependencies"]["test"]:
        assert "==" in dep, dep
