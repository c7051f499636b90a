"""Stage `report` (rule summarize): summary.json over every evaluated model, and the MLflow runs.

    python -m halludpo.report

summary.json: {"experiment", "rounds": [{"round", "model", "chair": {chair_s, chair_i, recall, len},
"pope": {<split>: {accuracy, precision, recall, f1, yes_ratio}}, "amber": {chair, cover, hal, cog, accuracy, f1,
amber_score}, "object_halbench": {response_hall, mention_hall, chair_s, recall, avg_words}, "mmhal": {average_score,
hallucination_rate}, "train": train_stats.json without timings}]}, a benchmark's block only when eval.benchmarks
names it;
fractions in 0-1. No timings (they are in the rule benchmarks): the same config gives the same bytes.

training_curves.png (round_<k>/train/, one per trained round): loss, reward margin and reward accuracy against the
training step, from train_log.jsonl. resolved_config.yaml: the experiment's config as this stage composed and
resolved it. Both, with summary.md, rounds.png and each round's eval files, are the results of Snakemake's HTML
report (`snakemake --report results/<experiment>/report.html`; captions in workflow/report/).

mlflow_runs.json: the MLflow run ids ({"logged": true, "tracking_uri", "experiment_id", "config_hash",
"parent_run_id", "rounds": {k: run id}}) or why nothing was logged ({"logged": false, "reason"}).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from omegaconf import DictConfig

from halludpo import paths
from halludpo.config import stage_main, to_plain
from halludpo.io import atomic_path, read_json, read_jsonl, write_json, write_text
from halludpo.metrics.amber import amber_headline
from halludpo.metrics.mmhal import HEADLINE_KEYS as MMHAL_KEYS
from halludpo.metrics.object_halbench import HEADLINE_KEYS as OBJECT_HALBENCH_KEYS
from halludpo.tracking import NOT_LOGGED, TrackingError, log_experiment, run_identity, tracking_uri

log = logging.getLogger(__name__)

CHAIR_KEYS = ("chair_s", "chair_i", "recall", "len")
POPE_KEYS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


def summary_row(k: int, model: str, chair_path: str | Path | None, pope_path: str | Path | None,
                amber_path: str | Path | None = None, object_halbench_path: str | Path | None = None,
                mmhal_path: str | Path | None = None) -> dict:
    """One model's row from its result files (None: that benchmark did not run)."""
    row: dict = {"round": k, "model": model}
    n_images = {}
    if chair_path is not None:
        chair = read_json(chair_path)
        row["chair"] = {key: chair["metrics"][key] for key in CHAIR_KEYS}
    if pope_path is not None:
        pope = read_json(pope_path)
        row["pope"] = {split: {key: m[key] for key in POPE_KEYS} for split, m in pope["metrics"].items()}
    if amber_path is not None:
        amber = read_json(amber_path)
        row["amber"] = amber_headline(amber)
    if chair_path is not None:
        row["chair_by_sentence"] = chair["metrics"].get("by_sentence", [])
        row["text_pipeline"] = chair["protocol"]["text_pipeline"]
        n_images["chair"] = chair["protocol"]["n_images"]
    if pope_path is not None:
        n_images["pope"] = len(pope["protocol"]["image_ids"])
    if amber_path is not None:
        row["amber_protocol"] = {key: amber["protocol"][key] for key in ("noun_pipeline", "answer_rule")} | {
            "matcher": amber["protocol"]["matcher"]["name"]}
        n_images["amber"] = amber["metrics"]["generative"]["n_responses"] if amber["metrics"]["generative"] else 0
    if object_halbench_path is not None:
        objhal = read_json(object_halbench_path)
        row["object_halbench"] = {key: objhal["metrics"][key] for key in OBJECT_HALBENCH_KEYS}
        n_images["object_halbench"] = objhal["protocol"]["n_images"]
    if mmhal_path is not None:
        mmhal = read_json(mmhal_path)
        row["mmhal"] = {key: mmhal["metrics"][key] for key in MMHAL_KEYS}
        row["mmhal_judge"] = mmhal["protocol"]["judge"]["model"]
        n_images["mmhal"] = mmhal["metrics"]["n"]
    row["n_images"] = n_images
    return row


def result_paths(cfg: DictConfig, k: int) -> dict[str, Path | None]:
    """model_k's result file per benchmark (None for a benchmark eval.benchmarks leaves out)."""
    files = {"chair": paths.chair_json(cfg, k), "pope": paths.pope_json(cfg, k), "amber": paths.amber_json(cfg, k),
             "object_halbench": paths.object_halbench_json(cfg, k), "mmhal": paths.mmhal_json(cfg, k)}
    return {name: (path if name in cfg.eval.benchmarks else None) for name, path in files.items()}


def training_curve(train_log: Path) -> list[dict]:
    """The round's Trainer log history: [{"step", "loss", "rewards/accuracies", ...}] (empty if not trained)."""
    if not train_log.is_file():
        return []
    return [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in read_jsonl(train_log)]


def plot_rounds(summary: dict, out: Path) -> None:
    """CHAIR_s, CHAIR_i, recall, POPE F1 (per split), AMBER's CHAIR, Cover, F1 and score, Object HalBench's two
    rates and recall against the round, one panel per benchmark that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rounds"]
    rounds = [r["round"] for r in rows]
    lines: dict[str, list[tuple[str, list[float]]]] = {}
    if rows and "chair" in rows[0]:
        lines["CHAIR (lower is better) and recall"] = [
            (label, [r["chair"][key] for r in rows])
            for key, label in (("chair_s", "CHAIR_s"), ("chair_i", "CHAIR_i"), ("recall", "recall"))]
    if rows and "pope" in rows[0]:
        lines["POPE F1"] = [(f"{split} F1", [r["pope"][split]["f1"] for r in rows]) for split in rows[0]["pope"]]
    if rows and "amber" in rows[0]:
        lines["AMBER"] = [(label, [r["amber"][key] for r in rows]) for key, label in AMBER_PLOTTED
                          if all(r["amber"][key] is not None for r in rows)]
    if rows and "object_halbench" in rows[0]:
        lines["Object HalBench"] = [(label, [r["object_halbench"][key] for r in rows])
                                    for key, label in OBJECT_HALBENCH_COLUMNS[:3]]
    if rows and "mmhal" in rows[0]:  # the 0-6 score on the 0-1 axis as score / 6
        lines["MMHal-Bench"] = [("score / 6", [r["mmhal"]["average_score"] / 6 for r in rows]),
                                ("hallucination rate", [r["mmhal"]["hallucination_rate"] for r in rows])]
    fig, axes = plt.subplots(1, max(len(lines), 1), figsize=(5 * max(len(lines), 1), 4), squeeze=False)
    for ax, (title, series) in zip(axes[0], lines.items()):
        for label, values in series:
            ax.plot(rounds, values, marker="o", label=label)
        ax.set_xlabel("round (model_k)")
        ax.set_xticks(rounds)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(title)
    fig.suptitle(summary["experiment"])
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# Training curves: (train_log.jsonl key, panel title, the prefixes of the keys drawn beside it in the same panel:
# halludpo.losses' per-term `loss/<term>`, `accuracy/<term>`, and the SFT term `sft_nll` of loss sigmoid)
CURVE_PANELS = (("loss", "loss", ("loss/", "sft_nll")), ("rewards/margins", "reward margin (chosen - rejected)", ()),
                ("rewards/accuracies", "reward accuracy", ("accuracy/",)))
TRAINING_PLOT = "training_curves.png"  # in round_<k>/train/, beside train_log.jsonl
RESOLVED_CONFIG = "resolved_config.yaml"  # in results/<experiment>/
PER_INVOCATION_KEYS = ("round", "step", "split")  # set by each rule for its own invocation: not the experiment's


def training_plot_path(cfg: DictConfig, k: int) -> Path:
    return paths.train_dir(cfg, k) / TRAINING_PLOT


def resolved_config_path(cfg: DictConfig) -> Path:
    return Path(cfg.paths.experiment_dir) / RESOLVED_CONFIG


def plot_training_curve(curve: list[dict], title: str, out: Path) -> None:
    """Loss, reward margin and reward accuracy against the training step (training_curve()'s rows), one panel
    each, the loss's terms as thin lines (`loss/<term>` and `accuracy/<term>` of halludpo.losses, `sft_nll`). Rows
    without a `loss` (the Trainer's closing totals) are left out; a panel without points says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in curve if "loss" in r]
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(4 * len(CURVE_PANELS), 3.5))
    for ax, (key, panel, term_prefixes) in zip(axes, CURVE_PANELS):
        terms = sorted({name for r in rows for name in r if name.startswith(term_prefixes)})
        for name, style in [(key, {"marker": "o", "markersize": 3, "linewidth": 1.5})] + [
                (t, {"linewidth": 0.8, "alpha": 0.7}) for t in terms]:
            points = [(r.get("step", i + 1), r[name]) for i, r in enumerate(rows) if name in r]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=name, **style)
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {key} in train_log.jsonl", ha="center", va="center", transform=ax.transAxes)
        elif terms:
            ax.legend(fontsize="small")
        if key == "rewards/accuracies":
            ax.set_ylim(-0.05, 1.05)
        if key == "rewards/margins":
            ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(panel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def resolved_config_yaml(cfg: DictConfig) -> str:
    """The experiment's config with every interpolation resolved, as YAML in the order Hydra composed it, without
    the keys each rule sets for its own invocation (PER_INVOCATION_KEYS)."""
    from omegaconf import OmegaConf

    plain = {k: v for k, v in to_plain(cfg).items() if k not in PER_INVOCATION_KEYS}
    return (f"# {cfg.experiment_name}: the resolved config (halludpo.report; round, step and split are set by each "
            f"rule)\n" + OmegaConf.to_yaml(OmegaConf.create(plain)))


def write_report_files(cfg: DictConfig, curves: dict[int, list[dict]]) -> None:
    """The HTML report's files that summary.json does not hold: each trained round's training curves and the
    resolved config."""
    for k, curve in sorted(curves.items()):
        plot_training_curve(curve, f"{cfg.experiment_name}: round {k} (model_{k} -> model_{k + 1})",
                            training_plot_path(cfg, k))
    write_text(resolved_config_path(cfg), resolved_config_yaml(cfg))


def build_summary(experiment: str, rows: list[dict]) -> dict:
    return {"experiment": experiment, "rounds": sorted(rows, key=lambda r: r["round"])}


AMBER_COLUMNS = (("chair", "AMBER CHAIR"), ("cover", "AMBER Cover"), ("hal", "AMBER Hal"), ("cog", "AMBER Cog"),
                 ("accuracy", "AMBER acc"), ("f1", "AMBER F1"), ("amber_score", "AMBER score"))
OBJECT_HALBENCH_COLUMNS = (("response_hall", "ObjHal response"), ("mention_hall", "ObjHal mention"),
                           ("recall", "ObjHal recall"))
AMBER_PLOTTED = (("chair", "AMBER CHAIR"), ("cover", "Cover"), ("f1", "discriminative F1"),
                 ("amber_score", "AMBER score"))


def markdown_table(summary: dict) -> str:
    """One line per round: CHAIR's columns, POPE F1 per split, AMBER's, Object HalBench's and MMHal-Bench's column
    groups (the benchmarks that ran)."""
    rows = summary["rounds"]
    first = rows[0] if rows else {}
    splits = list(first.get("pope", {}))
    head = ["round"]
    if "chair" in first:
        head += ["CHAIR_s", "CHAIR_i", "recall", "len"]
    head += [f"POPE {s} F1" for s in splits]
    if "amber" in first:
        head += [label for _, label in AMBER_COLUMNS]
    if "object_halbench" in first:
        head += [label for _, label in OBJECT_HALBENCH_COLUMNS]
    if "mmhal" in first:
        head += ["MMHal score (0-6)", "MMHal hal rate"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["round"])]
        if "chair" in first:
            c = r["chair"]
            cells += [f"{c['chair_s']:.3f}", f"{c['chair_i']:.3f}", f"{c['recall']:.3f}", f"{c['len']:.1f}"]
        cells += [f"{r['pope'][s]['f1']:.3f}" for s in splits]
        if "amber" in first:
            cells += ["" if r["amber"][key] is None else f"{r['amber'][key]:.3f}" for key, _ in AMBER_COLUMNS]
        if "object_halbench" in first:
            cells += [f"{r['object_halbench'][key]:.3f}" for key, _ in OBJECT_HALBENCH_COLUMNS]
        if "mmhal" in first:
            cells += [f"{r['mmhal']['average_score']:.2f}", f"{r['mmhal']['hallucination_rate']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def by_sentence_table(summary: dict) -> str:
    """CHAIR_i per sentence position and round, as 'CHAIR_i (hallucinated/mentions)' cells: shows whether a round
    removed hallucinations where they start or only cut the descriptions' tails."""
    rounds = [r for r in summary["rounds"] if r.get("chair_by_sentence")]
    if not rounds:
        return ""
    positions = max(len(r["chair_by_sentence"]) for r in rounds)
    head = ["round"] + [f"sentence {i + 1}" for i in range(positions)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rounds:
        cells = [f"{s['chair_i']:.3f} ({s['hallucinated']}/{s['mentions']})" for s in r["chair_by_sentence"]]
        lines.append("| " + " | ".join([str(r["round"])] + cells + [""] * (positions - len(cells))) + " |")
    return "\n".join(lines) + "\n"


CONSOLE_FD = "HALLUDPO_CONSOLE_FD"  # rule summarize hands the stage Snakemake's stderr as this file descriptor
TIMING_KEYS = ("train_seconds",)  # timings stay in the benchmarks files: the same config gives the same summary


def tell_console(level: int, message: str) -> None:
    """Log message and write it as one line where the user sees it: the file descriptor named by
    HALLUDPO_CONSOLE_FD (the rule's stderr, which Snakemake shows, while stderr goes to the rule's log)."""
    log.log(level, "%s", message)
    fd = os.environ.get(CONSOLE_FD)
    if fd:
        try:
            os.write(int(fd), (message + "\n").encode("utf-8"))
        except (OSError, ValueError):
            pass  # no such descriptor: the log has the line


def track(cfg: DictConfig, summary: dict, curves: dict[int, list[dict]] | None = None) -> dict:
    """Log the experiment to MLflow (runs found again, never added twice) and return the run ids; TrackingError
    (one line) when the store cannot be reached or fails."""
    artifacts = {}
    for r in summary["rounds"]:
        lmms_eval = paths.lmms_eval_dir(cfg, r["round"]) / "results.json"
        artifacts[r["round"]] = [path for path in result_paths(cfg, r["round"]).values() if path is not None] + (
            [lmms_eval] if lmms_eval.is_file() else [])
    return log_experiment(tracking_uri(cfg.tracking.tracking_uri), run_identity(to_plain(cfg)),
                          cfg.tracking.artifact_location, summary["rounds"], artifacts, curves,
                          plot=paths.rounds_plot(cfg))


def track_or_report(cfg: DictConfig, summary: dict, curves: dict[int, list[dict]]) -> dict:
    """mlflow_runs.json's content: the run ids ({"logged": true, ...}) or why nothing was logged
    ({"logged": false, "reason"}), never an earlier run's ids. An unreachable or failing store exits the stage with
    one line, unless tracking.required=false, which says once that nothing was logged."""
    if not cfg.tracking.enabled:
        return {"logged": False, "reason": "tracking.enabled=false"}
    try:
        return {"logged": True} | track(cfg, summary, curves)
    except TrackingError as err:
        if cfg.tracking.get("required", True):
            write_runs_file(cfg, {"logged": False, "reason": str(err)})
            tell_console(logging.ERROR, f"summarize: {err}; set tracking.required=false to finish without MLflow")
            sys.exit(1)
        tell_console(logging.WARNING, f"summarize: {NOT_LOGGED} (tracking.required=false): {err}; the results are "
                                      f"in {paths.summary_json(cfg)}")
        return {"logged": False, "reason": str(err)}


def write_runs_file(cfg: DictConfig, content: dict) -> None:
    write_json(paths.summary_json(cfg).parent / "mlflow_runs.json", content)


def without_timings(stats: dict) -> dict:
    """train_stats.json without its timings (TIMING_KEYS)."""
    return {k: v for k, v in stats.items() if k not in TIMING_KEYS}


def run(cfg: DictConfig) -> None:
    rows = [summary_row(k, str(paths.model_dir(cfg, k)), *result_paths(cfg, k).values())
            for k in range(cfg.rounds + 1)]
    curves = {k: training_curve(paths.train_dir(cfg, k) / "train_log.jsonl") for k in range(cfg.rounds)}
    for row in rows[:-1]:
        stats_file = paths.train_dir(cfg, row["round"]) / "train_stats.json"
        if stats_file.is_file():
            row["train"] = without_timings(read_json(stats_file))
    summary = build_summary(cfg.experiment_name, rows)
    out = paths.summary_json(cfg)
    write_json(out, summary)
    by_sentence = by_sentence_table(summary)
    write_text(out.parent / "summary.md", markdown_table(summary)
               + (f"\nCHAIR_i by sentence position (hallucinated / mentions):\n\n{by_sentence}" if by_sentence else ""))
    plot_rounds(summary, paths.rounds_plot(cfg))
    write_runs_file(cfg, track_or_report(cfg, summary, curves))
    write_report_files(cfg, curves)
    log.info("summary -> %s\n%s", out, markdown_table(summary))


main = stage_main(run)

if __name__ == "__main__":
    main()
