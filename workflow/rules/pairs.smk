# Round k's preference pairs. Only the rules of the configured method(s) are defined (PAIR_METHODS, verifiers.smk),
# so exactly one rule writes round_{k}/pairs/pairs.jsonl:
#   method=apasi           rules inject (shards), inject_pairs  -> pairs/pairs.jsonl
#                          (+ rule train_verifiers with method.verify, the verified-APASI extension)
#   method=sentinel        rules sentinel (shards), sentinel_pairs -> pairs/pairs.jsonl
#   method=apasi_sentinel  both                                 -> pairs/<method>/pairs.jsonl
#                          rule mix_pairs (weights, caps)       -> pairs/pairs.jsonl
# The model work runs in shard jobs (parallel.shards.inject / .sentinel): inject's text-only completions ->
# shards/completions.<i>-of-<n>.jsonl, SENTINEL's sampled trajectories -> shards/trajectories.<i>-of-<n>.jsonl,
# next to the method's pairs.jsonl; the *_pairs rules build the pairs from all shards (no model).
from halludpo.config import PER_ROUND_KEYS, per_round
from halludpo.mixing import apasi_verifies

MIXED = len(PAIR_METHODS) > 1
# the verifier settings a pairs rule's output depends on (device, dtype, batch_size change speed only)
VERIFIER_KEYS = ("verifier.kind", "verifier.kinds", "verifier.thresholds", "verifier.oracle", "verifier.models",
                 "verifier.text_thresholds", "verifier.max_queries")


def round_entries(config_json, k):
    """A subtree param with APASI's per-round schedules (method.injection_rates, method.mode) cut to round k's
    entry: editing a later round's entry does not rerun the earlier rounds."""
    tree = json.loads(config_json)
    for key in PER_ROUND_KEYS:
        if f"method.{key}" in tree:
            tree[f"method.{key}"] = per_round(tree[f"method.{key}"], k)
        elif key in tree.get("method", {}):
            tree["method"][key] = per_round(tree["method"][key], k)
    return json.dumps(tree, sort_keys=True)


def method_pairs(method):
    """Where a method's rule writes its pairs: pairs.jsonl itself, or its own file when a mix concatenates them."""
    if MIXED:
        return str(EXP / "round_{k}" / "pairs" / method / "pairs.jsonl")
    return str(EXP / "round_{k}" / "pairs" / "pairs.jsonl")


def method_stage(rule_name, method, **extra):
    """The stage command of one method's rule (step=<method> inside a mix)."""
    settings = {"round": "{wildcards.k}"} | ({"step": method} if MIXED else {}) | extra
    return stage("pairs", rule_name, **settings)


def method_shards(method, name):
    """A method's shard files (wildcards i, n), next to its pairs.jsonl."""
    return str(Path(method_pairs(method)).parent / "shards" / f"{name}.{{i}}-of-{{n}}.jsonl")


def pairs_gather(method, name):
    """A *_pairs rule's shard inputs (halludpo.shards.finished_shard_count keeps a finished output's count)."""
    return gathered_shards(method_pairs(method), method if method != "apasi" else "inject", name)


if "apasi" in PAIR_METHODS:

    APASI_CONFIG = lambda wildcards: round_entries(
        subtree(*method_config_keys(CFG.method, "apasi"), "data.vocabulary", "data.compounds",
                "eval.chair.text_pipeline", "seed", *(VERIFIER_KEYS if apasi_verifies(CFG.method) else [])),
        int(wildcards.k))

    rule inject:
        """APASI, shard {i} of {n}: the injected sentences' text-only completions by model_k (no image)."""
        input:
            code=code("pairs"),
            generations=str(EXP / "round_{k}" / "generate" / "gen.jsonl"),
            model=model_marker,
            vocabulary=CFG.data.vocabulary,
            verifiers=[str(paths.verifiers_marker(CFG))] if NEEDS_VERIFIERS else [],
        output:
            method_shards("apasi", "completions"),
        params:
            config=APASI_CONFIG,
        threads: workflow.cores
        conda:
            CONDA_ENV
        log:
            EXP / "logs" / "inject_{i}-of-{n}_r{k}.log",
        benchmark:
            EXP / "benchmarks" / "inject_{i}-of-{n}_r{k}.tsv"
        shell:
            "OMP_NUM_THREADS={threads} "
            + method_stage("inject", "apasi", shard="{wildcards.i}", shards="{wildcards.n}") + " > {log} 2>&1"

    rule inject_pairs:
        """APASI: hallucinations injected into model_k's own descriptions, completed (shards) without the image."""
        input:
            code=code("pairs"),
            generations=str(EXP / "round_{k}" / "generate" / "gen.jsonl"),
            completions=pairs_gather("apasi", "completions"),
            vocabulary=CFG.data.vocabulary,
            verifiers=[str(paths.verifiers_marker(CFG))] if NEEDS_VERIFIERS else [],
        output:
            method_pairs("apasi"),
        params:
            config=APASI_CONFIG,
            shards=lambda w, input: len(input.completions),
        threads: workflow.cores
        conda:
            CONDA_ENV
        log:
            EXP / "logs" / "inject_pairs_r{k}.log",
        benchmark:
            EXP / "benchmarks" / "inject_pairs_r{k}.tsv"
        shell:
            "OMP_NUM_THREADS={threads} "
            + method_stage("inject_pairs", "apasi", gather="true", shards="{params.shards}") + " > {log} 2>&1"


if USES_SENTINEL:
    SENTINEL_CFG = CFG.method.sentinel if MIXED else CFG.method

    SENTINEL_KEYS = (*method_config_keys(CFG.method, "sentinel"), *VERIFIER_KEYS, "data.vocabulary",
                     "data.compounds", "eval.chair.text_pipeline", "seed")

    rule sentinel:
        """SENTINEL, shard {i} of {n}: model_k samples sentence by sentence; two verifiers label each sentence's
        objects; the faithful context grows (trajectories)."""
        input:
            code=code("pairs"),
            model=model_marker,
            instances=SENTINEL_CFG.instances,
            vocabulary=CFG.data.vocabulary,
            verifiers=[str(paths.verifiers_marker(CFG))] if NEEDS_VERIFIERS else [],
        output:
            method_shards("sentinel", "trajectories"),
        params:
            config=subtree(*SENTINEL_KEYS),
        threads: workflow.cores
        conda:
            CONDA_ENV
        log:
            EXP / "logs" / "sentinel_{i}-of-{n}_r{k}.log",
        benchmark:
            EXP / "benchmarks" / "sentinel_{i}-of-{n}_r{k}.tsv"
        shell:
            "OMP_NUM_THREADS={threads} "
            + method_stage("sentinel", "sentinel", shard="{wildcards.i}", shards="{wildcards.n}") + " > {log} 2>&1"

    rule sentinel_pairs:
        """SENTINEL: pairs at the first hallucinated sentence, with the faithful context before it, from all
        shards' trajectories."""
        input:
            code=code("pairs"),
            trajectories=pairs_gather("sentinel", "trajectories"),
        output:
            method_pairs("sentinel"),
        params:
            config=subtree(*SENTINEL_KEYS),
            shards=lambda w, input: len(input.trajectories),
        conda:
            CONDA_ENV
        log:
            EXP / "logs" / "sentinel_pairs_r{k}.log",
        shell:
            method_stage("sentinel_pairs", "sentinel", gather="true", shards="{params.shards}") + " > {log} 2>&1"


if MIXED:

    rule mix_pairs:
        """A mixed method: the methods' pairs of round k concatenated, each weighted and capped (method.mix)."""
        input:
            code=code("pairs"),
            pairs=[str(EXP / "round_{k}" / "pairs" / m / "pairs.jsonl") for m in PAIR_METHODS],
        output:
            str(EXP / "round_{k}" / "pairs" / "pairs.jsonl"),
        params:
            config=subtree("method.name", "method.mix", "seed"),
        conda:
            CONDA_ENV
        log:
            EXP / "logs" / "mix_pairs_r{k}.log",
        shell:
            stage("pairs", "mix_pairs", round="{wildcards.k}", step="mix") + " > {log} 2>&1"
