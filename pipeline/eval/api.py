"""Evaluating a checkpoint: what the eval-on-checkpoint flow, the eval stage and `infinitevl eval` call.

A suite is named by a spec:
  tiny (or sample)   the built-in synthetic image questions (synthetic.py)
  pictures           held-out questions on the sample-data pictures (synthetic.py), the teacher's tasks
  longvideo          the needle task at growing frame counts, with its plot (longvideo.py)
  NAME=URL           an Arrow eval file made by importers.py, reported as NAME; a video benchmark in it
                     is scored at every frame count of the long-video config, like the needle task
  URL.arrow          the same, reported under the file's stem
  NAME               `<data_root>/NAME.arrow`, when a data root is given
Reports go to `<out_dir>/<suite>/` (see runner.py) plus `<out_dir>/summary.json` and `summary.md`.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from typing import TYPE_CHECKING

import torch

from pipeline import storage

from .dataset import read_samples
from .longvideo import LongVideoConfig, run_longvideo, run_video_benchmark
from .runner import EvalConfig, has_video, is_main_process, markdown_table, run_suite
from .suites import resolve_suite
from .synthetic import picture_samples, tiny_samples

if TYPE_CHECKING:
    from pipeline.config import RunConfig



def evaluate_checkpoint(checkpoint: str, config: "RunConfig | EvalConfig | dict | None" = None, *,
                        suite: str | list[str] | None = None, out_dir: str | None = None,
                        data_root: str | None = None, longvideo: LongVideoConfig | dict | None = None,
                        device: str | None = None, dtype: str | None = None) -> dict[str, float]:
    """Scores a checkpoint (local directory or fsspec URL) on one or more suites.

    `config` is the run config (its `eval` section gives the suites, sample limit and token budget) or
    the runner's own settings. `suite` overrides the suites; `data_root` is where bare suite names find
    their eval files (default: the run config's `eval.data_root`, if it has one). Reports go to `out_dir`, by default
    `<checkpoint>.eval/`. Returns flat scores in percent: one per suite (for video suites the mean over
    frame counts), `<suite>/<frames>` per frame count of a video suite, and `score`, the mean over suites.
    """
    suites, eval_config = _settings(config, suite)
    data_root = data_root or getattr(getattr(config, "eval", None), "data_root", None)
    out_dir = out_dir or checkpoint.rstrip("/") + ".eval"
    model, processor = load_checkpoint(checkpoint, device=device, dtype=dtype)
    results = evaluate_model(model, processor, suites, out_dir, eval_config, longvideo,
                             model_name=checkpoint.rstrip("/"), data_root=data_root)
    return flat_scores(results)


def evaluate_model(model, processor, suites: list[str], out_dir: str, config: EvalConfig | dict | None = None,
                   longvideo: LongVideoConfig | dict | None = None, model_name: str = "",
                   data_root: str | None = None) -> dict[str, dict]:
    """Runs suites on a model already in memory (e.g. during training); returns suite -> results."""
    config = EvalConfig.from_dict(config)
    frame_counts = LongVideoConfig.from_dict(longvideo).frame_counts
    results = {}
    for spec in suites:
        name, source = resolve_suite(spec, data_root)
        if source == "longvideo":
            results[name] = run_longvideo(model, processor, out_dir, longvideo, config, model_name)
        elif source == "tiny":
            results[name] = run_suite(model, processor, tiny_samples(), name, out_dir, config, model_name)
        elif source == "pictures":
            results[name] = run_suite(model, processor, picture_samples(kinds=config.pictures), name, out_dir, config,
                                      model_name)
        elif has_video(next(read_samples(source, limit=1), {})):
            # Video benchmarks are the paper's length-generalisation figure: every video at every frame count.
            results[name] = run_video_benchmark(model, processor, name, source, frame_counts, out_dir, config,
                                                model_name)
        else:
            results[name] = run_suite(model, processor, read_samples(source), name, out_dir, config, model_name)
    if is_main_process():
        _write_summary(results, out_dir)
    return results


def flat_scores(results: dict[str, dict]) -> dict[str, float]:
    scores: dict[str, float] = {}
    for name, r in results.items():
        if "rows" in r:  # long video: one score per frame count, the suite's score their mean
            for row in r["rows"]:
                scores[f"{name}/{row['frames']}"] = row["score"]
            scores[name] = sum(row["score"] for row in r["rows"]) / max(1, len(r["rows"]))
        else:
            scores[name] = r["score"]
    suite_scores = [scores[name] for name in results]
    scores["score"] = sum(suite_scores) / len(suite_scores) if suite_scores else 0.0
    return scores


def _settings(config, suite) -> tuple[list[str], EvalConfig]:
    if config is not None and hasattr(config, "eval") and hasattr(config.eval, "benchmarks"):  # a RunConfig
        section = config.eval
        suites = list(section.benchmarks)
        # Every runner setting the eval section has is taken; max_samples is the runner's limit.
        shared = {f.name: getattr(section, f.name) for f in fields(EvalConfig) if hasattr(section, f.name)}
        eval_config = EvalConfig(**{**shared, "limit": getattr(section, "max_samples", None),
                                    "pictures": config.picture_kinds})
    else:
        suites = ["tiny"]
        eval_config = EvalConfig.from_dict(config)
    if suite is not None:
        suites = [suite] if isinstance(suite, str) else list(suite)
    return suites, eval_config


def _write_summary(results: dict[str, dict], out_dir: str) -> None:
    root = out_dir.rstrip("/")
    summary = {"scores": flat_scores(results), "suites": results}
    storage.write_text(f"{root}/summary.json", json.dumps(summary, indent=2))
    table_rows = [r for r in results.values() if "rows" not in r]
    lines = [markdown_table(table_rows)] if table_rows else []
    for name, r in results.items():
        if "rows" in r:
            lines.append(f"\n{name}: " + ", ".join(f"{row['frames']} frames {row['score']:.1f}" for row in r["rows"])
                         + f" (plot: {r['plot']})\n")
    storage.write_text(f"{root}/summary.md", "".join(lines))


# -- loading ---------------------------------------------------------------------------------------------------

def load_checkpoint(checkpoint: str, device: str | None = None, dtype: str | None = None):
    """(model, processor) from a Hugging Face-format directory, local or at an fsspec URL: a teacher of any
    supported family (its transformers class) or any family's student (through AutoModelForImageTextToText;
    importing `model` registers them); config.json's model_type says which.
    """
    from transformers import AutoModelForImageTextToText

    import model as models
    from model.families.base import LOAD_KWARGS
    from model.processing import InfiniteVLProcessor

    # Under torchrun each process evaluates on its own GPU.
    device = device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    local = storage.local_dir(checkpoint)  # one of ours is checked against the files it was committed with
    config_path = os.path.join(local, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{checkpoint} has no config.json: not a Hugging Face-format checkpoint")
    with open(config_path) as f:
        model_type = json.load(f).get("model_type")
    try:
        family = models.family_of(str(model_type))
    except ValueError as e:
        raise RuntimeError(f"{checkpoint}: {e}") from None
    if model_type == family.teacher_model_type:
        model = models.load_teacher(local, dtype=torch_dtype)
    else:
        model = AutoModelForImageTextToText.from_pretrained(local, dtype=torch_dtype, **LOAD_KWARGS)
    processor = InfiniteVLProcessor.from_pretrained(local)
    return model.to(device).eval(), processor
