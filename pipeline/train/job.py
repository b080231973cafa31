"""The parent side of a training stage: check the config against its inputs, write the job file, launch
the workers (python / torchrun / deepspeed) as a process group whose output streams into the stage's
log, announce each checkpoint as it is committed, and report the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import threading

import fsspec

from pipeline.checkpoints import list_checkpoints
from pipeline.launch import launch, launch_command
from pipeline.stages import StageContext, join, read_json

CORPUS_OF_STAGE = {"stage1a": "distill", "stage1b": "distill", "stage2": "instruct", "stage3": "long"}


@dataclasses.dataclass
class TrainJob:
    stage: str
    section: dict
    student: dict
    init: str            # teacher dir (stage1a) or the previous stage's export
    teacher: str         # teacher dir: processor, and the teacher itself for stage1a
    corpus: str          # manifest URL of the packed corpus
    output: str
    seed: int
    logits: str | None = None
    extra_corpus: str | None = None  # stage III: Stage II data mixed in
    init_weights: str = "load"       # "random": the student built from init's config.json, weights drawn from seed

    def dump(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "TrainJob":
        with open(path) as f:
            return cls(**json.load(f))


class TrainConfigError(ValueError):
    """A training config that cannot work with its inputs, found before the first step."""


def run_training(ctx: StageContext, init: str) -> dict:
    job = make_job(ctx, init)
    check_job(job)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "job.json")
        job.dump(path)
        section = job.section
        cmd = launch_command(section["launcher"], "pipeline.train.worker", [path], section["nproc_per_node"])
        with CheckpointWatcher(ctx):
            launch(cmd, ctx.log)
    final = read_json(join(ctx.output, "export", "_EXPORTED.json"))
    if final is None:
        raise RuntimeError(f"{ctx.name}: the workers exited without writing {join(ctx.output, 'export')}")
    committed = list_checkpoints(ctx.output)
    metrics = read_json(join(committed[-1][1], "_CHECKPOINT.json"))["metrics"] if committed else {}
    return {"loss": metrics.get("loss"), "steps": section["steps"], "export": join(ctx.output, "export"),
            "tokens_per_s": metrics.get("tokens_per_s")}


def make_job(ctx: StageContext, init: str) -> TrainJob:
    config = ctx.config
    section = config.section(f"train.{ctx.name}").model_dump()
    data = ctx.inputs.get("data")
    corpus = join(data, CORPUS_OF_STAGE[ctx.name], "manifest.json") if data else None
    extra = join(data, "instruct", "manifest.json") if ctx.name == "stage3" and data else None
    return TrainJob(stage=ctx.name, section=section, student=config.student.model_dump(), init=init,
                    teacher=ctx.inputs.get("teacher") or _teacher_of(init), corpus=corpus, output=ctx.output,
                    seed=config.run.seed, logits=ctx.inputs.get("teacher-logits"), extra_corpus=extra)


def _teacher_of(export: str) -> str:
    marker = read_json(join(export, "_TEACHER.json")) or {}
    return marker.get("teacher", export)


def check_job(job: TrainJob) -> None:
    """The mistakes that would otherwise surface after minutes of start-up, named plainly."""
    from pipeline.data.loader import read_manifest

    if not _exists(join(job.init, "config.json")):
        raise TrainConfigError(f"{job.stage}: no model at {job.init} (config.json missing): "
                               f"run the stage that writes it first")
    if job.corpus is None or not _exists(job.corpus):
        raise TrainConfigError(f"{job.stage}: no packed corpus at {job.corpus}: run the data stage first")
    manifest = read_manifest(job.corpus)
    if job.section["seq_len"] > manifest["max_len"]:
        raise TrainConfigError(f"train.{job.stage}.seq_len {job.section['seq_len']} is above the shards' "
                               f"max_len {manifest['max_len']} ({job.corpus})")
    processor = load_processor(job.teacher)
    from pipeline.data.tokenize import processor_fingerprint

    if manifest.get("processor_fingerprint") not in (None, processor_fingerprint(processor)):
        raise TrainConfigError(f"{job.stage}: the shards at {job.corpus} were built with another tokenizer or "
                               f"processor than the teacher's at {job.teacher}")
    if job.stage == "stage1b" and not job.logits:
        raise TrainConfigError("stage1b needs the teacher-logits stage's output")


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def materialize(url: str) -> str:
    """A local directory holding `url` (downloaded once into a cache when it is remote)."""
    if "://" not in url or url.startswith("file://"):
        return url[len("file://"):] if url.startswith("file://") else url
    root = os.path.join(os.environ.get("INFINITEVL_CACHE", os.path.join(tempfile.gettempdir(), "infinitevl-cache")),
                        hashlib.sha256(url.encode()).hexdigest()[:16])
    done = os.path.join(root, ".complete")
    if not os.path.exists(done):
        fs, path = fsspec.core.url_to_fs(url)
        os.makedirs(root, exist_ok=True)
        fs.get(path.rstrip("/") + "/", root + "/", recursive=True)
        open(done, "w").close()
    return root


def load_processor(url: str):
    from model.processing import InfiniteVLProcessor

    return InfiniteVLProcessor.from_pretrained(materialize(url))


class CheckpointWatcher:
    """Announces (ctx.on_checkpoint → the orchestrator's event) every checkpoint the workers commit."""

    def __init__(self, ctx: StageContext, every_s: float = 2.0):
        self.ctx, self.every_s = ctx, every_s
        self.seen = {step for step, _ in list_checkpoints(ctx.output)}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._poll()
        return False

    def _run(self):
        while not self.stop.wait(self.every_s):
            self._poll()

    def _poll(self):
        try:
            found = list_checkpoints(self.ctx.output)
        except Exception as e:  # storage hiccup: try again next tick
            self.ctx.log.debug("checkpoint poll failed: %s", e)
            return
        for step, url in found:
            if step not in self.seen:
                self.seen.add(step)
                marker = read_json(join(url, "_CHECKPOINT.json")) or {}
                self.ctx.on_checkpoint(url, step, marker.get("metrics", {}))
