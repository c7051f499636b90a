import pytest

from halludpo import paths
from halludpo.config import ConfigError, compose, flatten, normalize_overrides, to_plain


def test_default_config_is_the_toy_apasi_experiment():
    cfg = compose()
    assert cfg.experiment_name == "toy_apasi"
    assert cfg.data.kind == "toy" and cfg.model.family == "toy"
    assert str(paths.summary_json(cfg)) == "results/toy_apasi/summary.json"
    assert str(paths.chair_json(cfg, 0)) == "results/toy_apasi/round_0/eval/chair.json"
    assert paths.model_dir(cfg, 0) == paths.base_model_dir(cfg)


def test_overrides_reach_every_group():
    cfg = compose(["paths.results=/tmp/x", "eval.chair.n_images=7", "eval.pope.n_images=5", "eval.amber.n_images=3",
                   "data.splits.eval=9"])
    assert cfg.paths.data_dir == "/tmp/x/data/toy"
    assert cfg.eval.chair.n_images == 7 and cfg.eval.pope.n_images == 5 and cfg.data.splits.eval == 9
    assert cfg.eval.amber.n_images == 3


@pytest.mark.parametrize("bad, message", [
    (["train.no_such_key=1"], "no_such_key"),
    (["model=no_such_model"], "model/no_such_model"),
    (["experiment=nope"], "experiment/nope"),
    (["model.family=gpt"], "model.family = 'gpt': must be one of toy, llava"),
    (["round=5"], "round = 5: must be in [0, rounds=2]"),
    (["train.beta=-1"], "train.beta = -1: must be a finite number > 0"),
])
def test_invalid_config_gives_one_clear_message(bad, message):
    with pytest.raises(ConfigError) as err:
        compose(bad)
    assert message in str(err.value)
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)
    assert "overrides" not in str(err.value) and str(bad) not in str(err.value)  # no echo of the override list


@pytest.mark.parametrize("raw, expected", [
    (None, []),
    ("[experiment=toy_apasi,rounds=1]", ["experiment=toy_apasi", "rounds=1"]),
    ("experiment=toy_apasi rounds=1", ["experiment=toy_apasi", "rounds=1"]),
    (["a=1", "b=2"], ["a=1", "b=2"]),
    ("[rounds=1,verifier.thresholds=[0.5,0.7]]", ["rounds=1", "verifier.thresholds=[0.5,0.7]"]),
    ("[method.instances='${data.train_instances}',rounds=1]", ["method.instances='${data.train_instances}'",
                                                               "rounds=1"]),
    ("[a='x,y', b={c:1,d:2}]", ["a='x,y'", "b={c:1,d:2}"]),
])
def test_normalize_overrides(raw, expected):
    assert normalize_overrides(raw) == expected


def test_bracketed_overrides_keep_the_quotes_hydra_needs():
    cfg = compose(normalize_overrides("[experiment=toy_sentinel,train.lora.target_modules='.*(q_proj|fc1)',"
                                      "method.instances='${data.train_instances}',experiment_name='a,b']"))
    assert cfg.train.lora.target_modules == ".*(q_proj|fc1)"
    assert cfg.method.instances == cfg.data.train_instances and cfg.experiment_name == "a,b"


def test_flatten_for_mlflow_params():
    flat = flatten(to_plain(compose()))
    assert flat["eval.chair.max_new_tokens"] == 64
    assert flat["eval.pope.splits"] == "['random', 'popular', 'adversarial']"
