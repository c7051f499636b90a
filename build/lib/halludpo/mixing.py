"""Which pair-building methods a config runs, and the mix of several methods' pairs in one round.

Light on imports: the Snakefile calls pair_methods at parse time to define only the rules of the configured
method(s), so there is never more than one rule for round k's pairs.jsonl.

    method=apasi           -> ["apasi"]               rule inject   writes pairs/pairs.jsonl
    method=sentinel        -> ["sentinel"]            rule sentinel writes pairs/pairs.jsonl
    method=apasi_sentinel  -> ["apasi", "sentinel"]   rules inject, sentinel write pairs/<method>/pairs.jsonl;
                                                      rule mix_pairs concatenates them into pairs/pairs.jsonl
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

SINGLE = ("apasi", "sentinel")
MIXES = {"apasi_sentinel": ("apasi", "sentinel")}
MIX_ONLY_KEYS = ("name", "mix", "sentinel")  # keys of a mixed method config that are not APASI's


def pair_methods(method_cfg: Mapping) -> list[str]:
    """The methods whose pairs a round uses, from cfg.method. A Hydra multi-select (method=[apasi,sentinel])
    merges both files into one node whose `name` is the last file's: refused, with the way out."""
    name = method_cfg["name"]
    if name in MIXES:
        return list(MIXES[name])
    if name not in SINGLE:
        raise ValueError(f"method.name={name!r}; valid: {', '.join([*SINGLE, *MIXES])}")
    if "injection_rates" in method_cfg and "sampling" in method_cfg:
        raise ValueError("method=[apasi,sentinel] merges both method files into one node (the last file's `name` "
                         "wins); use method=apasi_sentinel to mix the two methods' pairs")
    return [name]


def apasi_verifies(method_cfg: Mapping) -> bool:
    """Whether APASI's pairs are checked by the two object verifiers (method.verify, an extension)."""
    verify = method_cfg.get("verify") or {}
    return any(bool(verify.get(key)) for key in ("injected", "chosen", "complete", "correct"))


def uses_verifiers(method_cfg: Mapping) -> bool:
    """Whether a round's pairs need the object verifiers: SENTINEL always, APASI with method.verify."""
    methods = pair_methods(method_cfg)
    return "sentinel" in methods or ("apasi" in methods and apasi_verifies(method_cfg))


def method_settings(method_cfg: Mapping, method: str) -> Mapping:
    """One method's settings: cfg.method itself for a single method; for a mix, APASI's are cfg.method (its keys
    keep their meaning) and SENTINEL's are cfg.method.sentinel."""
    if method_cfg["name"] not in MIXES or method == "apasi":
        return method_cfg
    return method_cfg[method]


def method_config_keys(method_cfg: Mapping, method: str) -> list[str]:
    """Dotted config keys holding one method's settings (what its rule's params.config depends on)."""
    if method_cfg["name"] not in MIXES:
        return ["method"]
    if method == "apasi":
        return [f"method.{k}" for k in method_cfg if k not in MIX_ONLY_KEYS]
    return [f"method.{method}"]


def weighted_rows(rows: Sequence[dict], weight: float, cap: int | None, rng: random.Random) -> list[dict]:
    """round(weight * len(rows)) rows, at most cap: whole copies of rows for the integer part of the count, then a
    seeded sample without replacement for the rest; a cap below that takes a seeded sample of the result.
    Order of the input is kept within each copy."""
    if weight < 0:
        raise ValueError(f"mix weight must be >= 0, got {weight}")
    if cap is not None and cap < 0:
        raise ValueError(f"mix cap must be >= 0 or null, got {cap}")
    target = round(weight * len(rows))
    copies, rest = divmod(target, len(rows)) if rows else (0, 0)
    out = [dict(r) for _ in range(copies) for r in rows]
    out += [dict(rows[i]) for i in sorted(rng.sample(range(len(rows)), rest))]
    if cap is not None and len(out) > cap:
        out = [out[i] for i in sorted(rng.sample(range(len(out)), cap))]
    return out


def mix_pairs(by_method: Mapping[str, Sequence[dict]], mix_cfg: Mapping, seed: int) -> tuple[list[dict], dict]:
    """Concatenate the methods' pairs (in the order of by_method), each weighted and capped by mix_cfg[method]
    {weight, cap}; rows keep their `method` field and gain meta.mix_source. Returns rows and per-method counts."""
    rows: list[dict] = []
    stats: dict = {}
    for method, method_rows in by_method.items():
        settings = mix_cfg.get(method) or {}
        weight, cap = float(settings.get("weight", 1.0)), settings.get("cap")
        taken = weighted_rows(method_rows, weight, None if cap is None else int(cap),
                              random.Random(f"{seed}/mix/{method}"))
        for row in taken:
            row["meta"] = dict(row.get("meta") or {}, mix_source=method)
        rows += taken
        stats[method] = {"built": len(method_rows), "taken": len(taken), "weight": weight, "cap": cap}
    return rows, stats
