"""The data stage: the run's three corpora as tokenized, packed Arrow shards with manifests.

    distill   Stage I distillation mix           (data.distill)
    instruct  Stage II instruction mix           (data.instruct)
    long      Stage III long video and documents (data.long)

Steps: check that every source is there (before any work), then for each corpus resolve its sources and build
it (pipeline/data/stage.py: plan, shards in parallel, each committed by its marker, manifest last). The
published files are the shards each manifest lists, with the sha256 their builder recorded; readers (the
training loader, the teacher-logit stage) check each shard against it.

Recipe version 1. Bump VERSION when a change makes this stage write other bytes for the same config.
"""

from __future__ import annotations

from pipeline import storage
from pipeline.data import CORPORA, SAMPLE, SAMPLE_PICTURES
from pipeline.stages import StageContext

NAME = "data"
# the seed draws the sample data and the mix; the picture kinds are those the trained tiny teacher learned
SECTIONS = ("data", "run.seed", "teacher.train.pictures", "teacher.train.max_frames")
VERSION = 1
MANIFEST = "manifest.json"


def inputs(config) -> tuple[str, ...]:
    return ("teacher",)  # its processor tokenizes the records


def run(ctx: StageContext) -> dict:
    from pipeline.data.stage import build_corpora

    return build_corpora(ctx)


def outputs(folder: str) -> dict[str, dict]:
    files = {}
    for corpus in CORPORA:
        manifest = storage.read_json(storage.join(folder, corpus, MANIFEST))
        for shard in manifest["shards"]:
            files[f"{corpus}/{shard['file']}"] = {"sha256": shard["sha256"], "bytes": shard["bytes"]}
    return files


def check(config) -> list[str]:
    """Every source of every corpus (a file, a folder or a glob matching something) and every media root exists
    and can be read with the credentials at hand; the chat template a config names, too. The built-in sample
    corpora hold videos: they need PyAV here."""
    import importlib.util

    problems = []
    for corpus in CORPORA:
        for i, source in enumerate(getattr(config.data, corpus).sources):
            if source == SAMPLE and importlib.util.find_spec("av") is None:
                from pipeline.data.media import missing_package

                problems.append(f"data.{corpus}.sources[{i}]: the sample corpora hold videos, which need "
                                f"{missing_package('av')}")
            if source in (SAMPLE, SAMPLE_PICTURES):
                continue
            field = f"data.{corpus}.sources[{i}]"
            path = source if isinstance(source, str) else source.path
            problems += _missing(field if isinstance(source, str) else f"{field}.path", path)
            if not isinstance(source, str) and source.media_root:
                problems += _missing(f"{field}.media_root", source.media_root)
    if getattr(config.data, "chat_template", None):
        problems += _missing("data.chat_template", config.data.chat_template)
    return problems


def _missing(field: str, url: str) -> list[str]:
    try:
        if any(c in url for c in "*?["):
            fs, path = storage.filesystem(url)
            found = fs.glob(path)
            return [] if found else [f"{field}: {url!r} matches nothing"]
        return [] if storage.exists(url) else [f"{field}: {url!r} does not exist"]
    except (OSError, ValueError) as exc:
        return [f"{field}: cannot read {url!r}: {exc}"]
