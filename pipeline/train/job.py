"""The parent side of a training stage: check the config against its inputs, write the job file, launch
the workers (python / torchrun / deepspeed; on several nodes torchrun's c10d rendezvous, pipeline.multinode)
as a process group whose output streams into the stage's log, announce each checkpoint as it is committed,
and report the result.
"""

from __future__ import annotations

import dataclasses
import json
import threading

from pipeline import storage
from pipeline.checkpoints import checkpoint_metrics, list_checkpoints
from pipeline.config import StudentSection, TrainSection, TrainStageSection
from pipeline.kernel_cache import FOLDER as KERNEL_CACHE
from pipeline.multinode import FILES, launch_stage, processes_per_node
from pipeline.stages import StageContext, join

CORPUS_OF_STAGE = {"stage1a": "distill", "stage1b": "distill", "stage2": "instruct", "stage3": "long"}
EXPORT = "export"  # the model a training stage hands to the next, committed by its _FILES.json


@dataclasses.dataclass
class TrainJob:
    """Everything a training process needs, written to a JSON file the workers read. `section` is the stage's
    typed config section (pipeline.config): the worker reads its fields, never a dict with defaults of its own."""
    stage: str
    section: TrainStageSection
    student: StudentSection | dict
    init: str            # teacher dir (stage1a) or the previous stage's export
    teacher: str         # teacher dir: processor, and the teacher itself for stage1a
    corpus: str          # manifest URL of the packed corpus
    output: str
    seed: int
    logits: str | None = None
    init_weights: str = "load"       # "random": the student built from init's config.json, weights drawn from seed
    checkpoints: bool = True         # benchmarks measure steps alone: no checkpoints, no export
    export: bool = True
    kernel_cache: str | None = None  # where the run's nodes share kernel tuning (pipeline/kernel_cache.py)

    def __post_init__(self):
        if isinstance(self.section, dict):
            self.section = section_type(self.stage).model_validate(self.section)
        if isinstance(self.student, dict) and self.student:
            self.student = StudentSection.model_validate(self.student)

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields["section"] = self.section.model_dump(mode="json")
        fields["student"] = self.student.model_dump(mode="json") if isinstance(self.student, StudentSection) else {}
        return json.dumps(fields, indent=2)

    def dump(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str) -> "TrainJob":
        with open(path) as f:
            return cls(**json.load(f))


def section_type(stage: str) -> type[TrainStageSection]:
    """The config section class of a training stage (KLStageSection for stage1b, LongStageSection for stage3)."""
    if stage not in TrainSection.model_fields:
        raise ValueError(f"{stage!r} is not a training stage; training stages: {', '.join(TrainSection.model_fields)}")
    return TrainSection.model_fields[stage].annotation


class TrainConfigError(ValueError):
    """A training config that cannot work with its inputs, found before the first step."""


def run_training(ctx: StageContext, init: str) -> dict:
    """The parent side of a training stage: check the job, launch the workers, report what they committed."""
    job = make_job(ctx, init)
    check_job(job)
    section = job.section
    if set(section.trainable) == {"linear_attn"} and not linear_layers(job):
        return export_untrained(ctx, job)
    with CheckpointWatcher(ctx):
        launch_stage(ctx, "pipeline.train.worker", [f"{FILES}/job.json"],
                     processes_per_node(ctx.config, section.nproc_per_node), section.launcher,
                     files={"job.json": job.to_json()})
    export = join(ctx.output, EXPORT)
    if storage.committed_files(export) is None:
        raise RuntimeError(f"{ctx.name}: the workers exited without committing {export}")
    committed = list_checkpoints(ctx.output)
    metrics = checkpoint_metrics(committed[-1][1])["metrics"] if committed else {}
    return {"loss": metrics.get("loss"), "steps": job.section.steps, "export": export,
            "tokens_per_s": metrics.get("tokens_per_s")}


def linear_layers(job: TrainJob) -> list[int]:
    """The student's linear layers, resolved from the teacher's config.json and the run's `student` section."""
    from model import family_of_checkpoint

    from .objectives import student_config

    teacher_dir = storage.local_dir(job.teacher, only=lambda rel: rel == "config.json")
    teacher_config = family_of_checkpoint(teacher_dir).teacher_class.config_class.from_pretrained(teacher_dir)
    layer_types = student_config(teacher_config, job.student).text_config.layer_types
    return [i for i, t in enumerate(layer_types) if t == "linear_attention"]


def export_untrained(ctx: StageContext, job: TrainJob) -> dict:
    """A stage that trains only the linear mixers, for a student that has none (all sliding attention: the
    mechanisms bench's share-1 arm), has nothing to learn: it commits the model it starts from as its export
    (Stage I-a: the converted teacher; Stage I-b: Stage I-a's export), so the stages after it run as usual."""
    import tempfile

    from model.checkpoint import save_pretrained

    from .objectives import converted_student

    export = join(ctx.output, EXPORT)
    ctx.log.info("%s: the student has no linear layers, so %s (trainable: linear_attn) has nothing to train; its "
                 "export is the model it starts from", ctx.name, ctx.name)
    if job.init == job.teacher:
        with tempfile.TemporaryDirectory(prefix=f"infinitevl-{ctx.name}-") as work:
            student = converted_student(materialize(job.teacher), job.student)
            save_pretrained(student, load_processor(job.teacher), work)
            storage.publish_dir(work, export, stage=ctx.name, step=0)
    else:
        storage.publish_dir(materialize(job.init), export, stage=ctx.name, step=0)
    return {"loss": None, "steps": 0, "export": export, "tokens_per_s": None,
            "trained": "no: the student has no linear layers"}


def export_files(folder: str) -> dict[str, dict]:
    """A training stage's published files: its export, as the worker committed it."""
    return {f"{EXPORT}/{rel}": f for rel, f in storage.committed_files(join(folder, EXPORT)).items()}


def make_job(ctx: StageContext, init: str) -> TrainJob:
    config = ctx.config
    data = ctx.inputs.get("data")
    corpus = join(data, CORPUS_OF_STAGE[ctx.name], "manifest.json") if data else None
    return TrainJob(stage=ctx.name, section=config.section(f"train.{ctx.name}"), student=config.student, init=init,
                    teacher=ctx.inputs.get("teacher") or _teacher_of(init), corpus=corpus, output=ctx.output,
                    seed=config.run.seed, logits=ctx.inputs.get("teacher-logits"),
                    kernel_cache=join(config.run.root, KERNEL_CACHE))


def _teacher_of(export: str) -> str:
    marker = storage.read_json_or_none(join(export, "_TEACHER.json")) or {}
    return marker.get("teacher", export)


def check_job(job: TrainJob) -> None:
    """The mistakes that would otherwise surface after minutes of start-up, named plainly."""
    from pipeline.data.loader import read_manifest

    if not storage.exists(join(job.init, "config.json")):
        raise TrainConfigError(f"{job.stage}: no model at {job.init} (config.json missing): "
                               f"run the stage that writes it first")
    if job.corpus is None or not storage.exists(job.corpus):
        raise TrainConfigError(f"{job.stage}: no packed corpus at {job.corpus}: run the data stage first")
    manifest = read_manifest(job.corpus)
    if job.section.seq_len > manifest["max_len"]:
        raise TrainConfigError(f"train.{job.stage}.seq_len {job.section.seq_len} is above the shards' "
                               f"max_len {manifest['max_len']} ({job.corpus})")
    processor = load_processor(job.teacher)
    from pipeline.data.tokenize import processor_fingerprint

    if manifest.get("processor_fingerprint") not in (None, processor_fingerprint(processor)):
        raise TrainConfigError(f"{job.stage}: the shards at {job.corpus} were built with another tokenizer or "
                               f"processor than the teacher's at {job.teacher}")
    if job.stage == "stage1b" and not job.logits:
        raise TrainConfigError("stage1b needs the teacher-logits stage's output")
    # every shard the workers will read, by size (cheap: no byte is read): a truncated or missing one is named now,
    # not when the loader first reaches it; each is hashed when a worker opens it
    from pipeline.data.loader import shard_urls

    shards = {url: entry for url, entry in zip(shard_urls(job.corpus, manifest), manifest["shards"])}
    if job.logits:
        logit_manifest = storage.read_json(join(job.logits, "manifest.json"))
        shards.update({join(job.logits, e["file"]): e for e in logit_manifest["shards"]})
    storage.check_sizes({url: entry["bytes"] for url, entry in shards.items()})


def materialize(url: str) -> str:
    """A local folder holding the model directory at `url`, checked against the files its writer committed."""
    return storage.local_dir(url)


def load_processor(url: str):
    from model.processing import InfiniteVLProcessor

    # the processor's files only: the weights are checked where they are loaded
    return InfiniteVLProcessor.from_pretrained(storage.local_dir(url, only=_processor_file))


def _processor_file(rel: str) -> bool:
    return not rel.endswith((".safetensors", ".bin"))


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
                self.ctx.on_checkpoint(url, step, checkpoint_metrics(url).get("metrics", {}))
