"""What a run did, for a person: `<run root>/report.md` with a loss-curve plot per stage beside it.

Per stage: its state (ran now, already committed, failed, stale, not run), time, tokens, final loss and
output; for the eval stage the student's score on each suite, the teacher's where it was scored, and the
retention. Written at the end of every run (the CLI and the Prefect flow alike, also when a stage failed);
the flow publishes the same markdown as an artifact.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

from . import storage
from .config import RunConfig
from .stages import STAGE_ORDER, TRAINING_STAGES, StageOutcome, join

REPORT = "report.md"
PLOTS = "report"  # <run root>/report/<stage>-loss.png
CORPORA = ("distill", "instruct", "long")


@dataclass
class Report:
    markdown: str
    plots: dict[str, bytes] = field(default_factory=dict)  # file name under PLOTS -> PNG


def stage_rows(config: RunConfig, outcomes: dict[str, StageOutcome] | None = None,
               failed: dict[str, str] | None = None) -> list[dict]:
    """One row per stage of the whole run (not only those this run touched): status, time, tokens, final loss,
    output, from the commit markers; `outcomes` (this run's) say what ran now and what was skipped, `failed` which
    stage failed and why."""
    from .plan import status

    outcomes, failed = outcomes or {}, failed or {}
    states = status(config)
    rows = []
    for name in STAGE_ORDER:
        state = states[name]
        marker = state.marker if state.state == "done" else None
        outcome = outcomes.get(name)
        if name in failed:
            shown = f"failed: {failed[name]}"
        elif outcome is not None:
            shown = "ran now" if outcome.status == "done" else "already committed"
        elif state.state == "done":
            shown = "committed earlier"
        elif name not in config.run.stages:
            shown = "not in run.stages"
        else:
            shown = {"missing": "to do", "partial": "unfinished (resumes)"}.get(state.state, state.state)
            shown += f" ({'; '.join(state.reasons)})" if state.reasons and state.state == "stale" else ""
        metrics = (marker or {}).get("metrics", {})
        duration = (marker or {}).get("duration_s")
        rows.append({"stage": name, "status": shown, "time": format_seconds(duration),
                     "tokens": _tokens(name, metrics, marker), "loss": format_number(metrics.get("loss")),
                     "output": (marker or {}).get("output", "-"), "marker": marker})
    return rows


def build_report(config: RunConfig, outcomes: dict[str, StageOutcome] | None = None,
                 failed: dict[str, str] | None = None) -> Report:
    """report.md of a run: the stage table, the evaluation, the loss curves."""
    rows = stage_rows(config, outcomes, failed)
    plots = {}
    for row in rows:
        curve = _loss_curve(row["stage"], row["marker"]["output"]) if row["marker"] else []
        if len(curve) > 1:
            plots[f"{row['stage']}-loss.png"] = line_plot_png({"loss": curve}, f"{row['stage']} loss")
    eval_marker = next(r["marker"] for r in rows if r["stage"] == "eval")
    lines = [f"# infinitevl run `{config.run.name}`", "",
             f"Run root `{config.run.root}`, config `{join(config.run.root, 'config.yaml')}`, written "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    if failed:
        lines += [f"**Failed** at {', '.join(failed)}: the stages before it stay committed; the next run resumes.", ""]
    lines += ["| stage | status | time | tokens | final loss | output |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['time']} | {r['tokens']} | {r['loss']} | `{r['output']}` |"
              for r in rows]
    if eval_marker is not None:
        lines += ["", *eval_section(config, eval_marker.get("metrics", {}))]
    if plots:
        lines += ["", "## Loss curves", ""]
        lines += [f"![{name.removesuffix('.png')}]({PLOTS}/{name})" for name in plots]
    return Report("\n".join(lines) + "\n", plots)


def eval_section(config: RunConfig, metrics: dict) -> list[str]:
    """The student's score per suite beside the teacher's (where the eval stage scored it) and the retention."""
    from .eval.suites import resolve_suite

    lines = [f"## Evaluation of `{metrics.get('checkpoint', config.eval.target)}`", "",
             "| suite | student | teacher |", "|---|---|---|"]
    for spec in config.eval.benchmarks:
        name = resolve_suite(spec)[0]
        student, teacher = format_number(metrics.get(name)), format_number(metrics.get("teacher_" + name))
        lines.append(f"| {name} | {student} | {teacher} |")
    if metrics.get("retention") is not None:
        lines += ["", f"Retention (student / teacher on the held-out suite): **{metrics['retention']:.3f}**"]
    return lines


def write_report(config: RunConfig, report: Report) -> str:
    """Writes report.md and its plots under the run root; returns the report's URL."""
    for name, png in report.plots.items():
        storage.write_bytes(join(config.run.root, PLOTS, name), png)
    url = join(config.run.root, REPORT)
    storage.write_bytes(url, report.markdown.encode())
    return url


def line_plot_png(series: dict[str, list[tuple[float, float]]], title: str = "") -> bytes:
    """One panel per series (x = step), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3), squeeze=False)
    for ax, (metric, points) in zip(axes[0], series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(f"{title} {metric}".strip() if len(series) > 1 else (title or metric))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


def _loss_curve(name: str, output: str) -> list[tuple[float, float]]:
    if name in TRAINING_STAGES:
        records = storage.read_jsonl(join(output, "logs", "steps.jsonl"))
        return [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), (int, float))]
    if name == "teacher":
        report = storage.read_json_or_none(join(output, "training_report.json")) or {}
        return [(point["step"], point["loss"]) for point in report.get("loss_curve", [])]
    return []


def _tokens(name: str, metrics: dict, marker: dict | None) -> str:
    if marker is None:
        return "-"
    if name in TRAINING_STAGES:
        total = sum(r.get("tokens", 0) for r in storage.read_jsonl(join(marker["output"], "logs", "steps.jsonl")))
        return f"{total:,}" if total else "-"
    if name == "data":
        return f"{sum(metrics.get(f'{c}_tokens', 0) for c in CORPORA):,}"
    if name == "teacher" and metrics.get("train_tokens"):
        return f"{metrics['train_tokens']:,}"
    if name == "teacher-logits" and metrics.get("tokens") is not None:
        return f"{metrics['tokens']:,}"
    return "-"


def format_seconds(value) -> str:
    """A duration as a person reads it: seconds, minutes past two of them; '-' where there is none."""
    if value is None:
        return "-"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def format_number(value) -> str:
    """A metric to four significant figures; '-' where there is none."""
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)
