"""What a training stage trains, built inside each worker: the module DeepSpeed wraps, its data stream, its export.

Each training recipe (pipeline/recipes/stage1a.py ... stage3.py) has a `build(job, dtype, device, log)` that
returns a `TrainSetup`; the stages that train the student itself share `student_setup`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .job import TrainJob, load_processor, materialize
from .objectives import StudentObjective, export_student, load_student
from .params import select_trainable

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks


@dataclasses.dataclass
class TrainSetup:
    job: TrainJob
    module: torch.nn.Module
    processor: object
    dtype: torch.dtype
    export_fn: Callable
    flops_per_token: float
    logits: object = None

    def loader(self, rank: int, world: int):
        from pipeline.data.loader import PackedLoader

        return PackedLoader(self.job.corpus, self.processor, rank=rank, world_size=world, seed=self.job.seed,
                            num_workers=self.job.section.loader_workers)

    def next_rows(self, batches) -> list[dict]:
        """One micro-batch's packed rows from the loader's workers."""
        return [next(batches) for _ in range(self.job.section.micro_batch_size)]

    def prepare(self, rows: list[dict]) -> dict:
        """The rows as one packed row with their stored teacher logits where the stage reads them, on the host
        (pipeline/train/prefetch.py runs this ahead in a thread); on CUDA pinned, so that copies need not wait."""
        batch = concat_packed(rows)
        if self.logits is not None:
            batch.update(self.logits.for_rows(rows))
        if torch.cuda.is_available():
            batch = {k: (v.pin_memory() if torch.is_tensor(v) else v) for k, v in batch.items()}
        return batch

    def to_device(self, batch: dict, device) -> dict:
        """The copies to `device`, in the step's dtype; from pinned memory they do not block this thread."""
        return {k: (v.to(device, self.dtype if v.is_floating_point() else v.dtype, non_blocking=True)
                    if torch.is_tensor(v) else v) for k, v in batch.items()}

    def mfu(self, tokens_per_s: float) -> float:
        """6·N·tokens/s over the card's peak (N: the decoder layers' parameters; attention, the LM head at the
        supervised positions and the vision tower are left out, so this is a lower bound). NaN off GPU."""
        if not torch.cuda.is_available():
            return float("nan")
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
        return self.flops_per_token * tokens_per_s / peak if peak else float("nan")

    def export(self, state: dict, out_dir: str, checkpoint: bool = False) -> None:
        self.export_fn(state, out_dir, checkpoint=checkpoint)


def student_setup(job: TrainJob, dtype: torch.dtype, device, kind: str, log=None, lora=None) -> TrainSetup:
    """Stages I-b, II, III: the previous stage's student, scored by `kind` ("kl" to the stored teacher logits,
    "ce" on answer tokens), its `trainable` groups selected; with `lora` (Stage III) wrapped in adapters."""
    processor = load_processor(job.teacher)
    section = job.section
    student = build_student(job, dtype, device)
    layer_types = student.config.text_config.layer_types
    if section.gradient_checkpointing:
        enable_checkpointing(student, section.recompute_share)
    if lora is not None:
        from .lora import add_lora  # peft only where adapters are

        student = add_lora(student, lora)
    module = StudentObjective(student, kind, getattr(section, "temperature", 1.0))
    counts = select_trainable(module, section.trainable, layer_types)
    config = student.config

    def export_fn(state, out, checkpoint=False):
        # a checkpoint's copy is always merged: evaluating it must see the adapters
        merged = None if lora is None else lora.model_copy(update={"merge": lora.merge or checkpoint})
        export_student(config, state, out, processor, merged)

    # the decoder layers a text token passes through; the embedding is a lookup, the LM head runs only where
    # the loss reads logits, the vision tower only on image patches
    flops = 6 * sum(p.numel() for n, p in student.named_parameters() if "language_model.layers." in n)
    if log:
        log_trainable(job, counts, log)
    return TrainSetup(job, module, processor, dtype, export_fn, flops)


def log_trainable(job: TrainJob, counts: dict[str, int], log) -> None:
    log(f"{job.stage}: trainable parameters " + ", ".join(f"{g} {n:,}" for g, n in counts.items()))


def build_student(job: TrainJob, dtype: torch.dtype, device):
    """The previous stage's export, or with `init_weights: random` a student of init's config.json with
    weights drawn from the job's seed, built where it trains (benchmarks: no 9 GB checkpoint on disk)."""
    if job.init_weights == "load":
        return load_student(materialize(job.init), dtype).to(device)
    if job.init_weights != "random":
        raise ValueError(f"init_weights {job.init_weights!r}: use load or random")
    from transformers import AutoConfig

    from model import family_of

    config = AutoConfig.from_pretrained(materialize(job.init))  # any family's student (`import model` registers them)
    torch.manual_seed(job.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            student = family_of(config).model_class(config)
    finally:
        torch.set_default_dtype(previous)
    return student.train()


def enable_checkpointing(model, share: float = 1.0) -> None:
    """Activation checkpointing of the model's blocks: `share` of each stack's blocks (vision tower, decoder)
    recompute their activations in the backward, spread evenly (1 every block, 0.5 every second, 2/3 two in
    three); the others keep theirs. A share, not an interval: a block kept costs its activations whole (~3.5 GB
    at 32K tokens for a 3B block), so the card's memory decides how many fit, and steps finer than every n-th
    block (n = 2 keeps half, the next coarser keeps a third) let more of them stay."""
    from torch import nn
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.activation_checkpointing_enable({"use_reentrant": False})
    for stack in model.modules():
        if not isinstance(stack, nn.ModuleList):
            continue
        blocks = [m for m in stack if isinstance(m, GradientCheckpointingLayer)]
        chosen = recomputed_blocks(len(blocks), share)
        for i, block in enumerate(blocks):
            block.gradient_checkpointing = i in chosen


def recomputed_blocks(n: int, share: float) -> set[int]:
    """Which of n blocks recompute: round(share·n) of them, evenly spaced, the last block among them."""
    k = round(share * n)
    return {i for i in range(n) if (i + 1) * k // n > i * k // n}


def concat_packed(rows: list[dict]) -> dict:
    """Several packed sequences as one (documents stay apart: their boundaries are kept)."""
    if len(rows) == 1:
        return dict(rows[0])
    out = {k: torch.cat([r[k] for r in rows], -1) for k in ("input_ids", "labels", "mm_token_type_ids")}
    out["position_ids"] = torch.cat([r["position_ids"] for r in rows], -1)
    offsets, cu = 0, [torch.zeros(1, dtype=torch.int32)]
    for r in rows:
        cu.append(r["cu_seqlens"][1:].to(torch.int32) + offsets)
        offsets += int(r["input_ids"].shape[-1])
    out["cu_seqlens"] = torch.cat(cu)
    for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        parts = [r[k] for r in rows if r.get(k) is not None]
        if parts:
            out[k] = torch.cat(parts)
    out["position"] = [r.get("position") for r in rows]
    return out


class StoredLogits:
    """The teacher's stored top-k for the rows of a micro-batch, as the KL loss takes them: positions in the
    concatenated row, top-k ids, and log-probabilities normalised over the full vocabulary (so the stored
    log-partition is 0 and the tail mass is what the top-k leave)."""

    def __init__(self, url: str, seed: int):
        from pipeline.teacher_logits.reader import TeacherLogitReader

        self.reader, self.seed = TeacherLogitReader(url), seed

    def for_rows(self, rows: list[dict]) -> dict:
        positions, index, logp, offset = [], [], [], 0
        for row in rows:
            t = self.reader.for_batch(row, seed=self.seed)
            positions.append(t.positions + offset)
            index.append(t.indices)
            logp.append(t.log_probs)
            offset += int(row["input_ids"].shape[-1])
        logp = torch.cat(logp)
        return {"logit_positions": torch.cat(positions), "topk_index": torch.cat(index), "topk_logit": logp,
                "logit_lse": torch.zeros(logp.shape[0], dtype=logp.dtype)}
