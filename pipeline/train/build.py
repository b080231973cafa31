"""Builds a stage's recipe inside a worker: the module DeepSpeed trains, its data stream, its export."""

from __future__ import annotations

import dataclasses

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from model import InfiniteVLConfig

from .job import TrainJob, load_processor, materialize
from .params import select_trainable
from .recipes import LayerwiseAligner, StudentObjective, export_student, load_student, student_overrides

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks


@dataclasses.dataclass
class Recipe:
    job: TrainJob
    module: torch.nn.Module
    processor: object
    dtype: torch.dtype
    export_fn: object
    flops_per_token: float
    logits: object = None

    def loader(self, rank: int, world: int):
        from pipeline.data.loader import PackedLoader

        return PackedLoader(self.job.corpus, self.processor, rank=rank, world_size=world, seed=self.job.seed,
                            num_workers=self.job.section.get("loader_workers", 2))

    def next_rows(self, batches) -> list[dict]:
        """One micro-batch's packed rows from the loader's workers."""
        return [next(batches) for _ in range(self.job.section["micro_batch_size"])]

    def collate(self, rows: list[dict], device) -> dict:
        """The rows as one packed row on `device`, with their stored teacher logits where the stage reads them."""
        batch = concat_packed(rows)
        if self.logits is not None:
            batch.update(self.logits.for_rows(rows))
        return {k: (v.to(device, self.dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v)
                for k, v in batch.items()}

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


def build_recipe(job: TrainJob, dtype: torch.dtype, device, log=None) -> Recipe:
    processor = load_processor(job.teacher)
    section = job.section
    if job.stage == "stage1a":
        teacher = Qwen2_5_VLForConditionalGeneration.from_pretrained(materialize(job.teacher), dtype=dtype,
                                                                     use_safetensors=True).to(device)
        n_layers = teacher.config.text_config.num_hidden_layers
        config = InfiniteVLConfig.from_teacher(teacher.config, **student_overrides(job.student, n_layers))
        module = LayerwiseAligner(teacher, config, loss_scale=section.get("loss_scale", 1000.0)).to(device)
        if section["trainable"] != ["linear_attn"]:
            raise ValueError("train.stage1a.trainable must be [linear_attn]: layer-wise alignment trains the "
                             "linear mixers (Gated DeltaNet, GLA or Mamba2) only")
        module.teacher.requires_grad_(False)
        counts = {"linear_attn": sum(p.numel() for p in module.mixers.parameters())}
        teacher_dir = materialize(job.teacher)
        export_fn = lambda state, out, checkpoint=False: module.export(state, teacher_dir, out, processor)  # noqa: E731
        flops = 6 * counts["linear_attn"] + 2 * sum(p.numel() for p in teacher.parameters())
        recipe = Recipe(job, module, processor, dtype, export_fn, flops)
    else:
        student = build_student(job, dtype, device)
        layer_types = student.config.text_config.layer_types
        if section.get("gradient_checkpointing"):
            enable_checkpointing(student, section.get("checkpoint_every_n_layers", 1))
        if job.stage == "stage3":
            from .lora import add_lora  # peft only where adapters are

            student = add_lora(student, section["lora"])
        kind = "kl" if job.stage == "stage1b" else "ce"
        module = StudentObjective(student, kind, section.get("temperature", 1.0))
        counts = select_trainable(module, section["trainable"], layer_types)
        lora = section["lora"] if job.stage == "stage3" else None
        config = student.config
        def export_fn(state, out, checkpoint=False):
            # a checkpoint's copy is always merged: evaluating it must see the adapters
            merged = None if lora is None else {**lora, "merge": lora.get("merge", True) or checkpoint}
            export_student(config, state, out, processor, merged)
        # the decoder layers a text token passes through; the embedding is a lookup, the LM head runs only where
        # the loss reads logits, the vision tower only on image patches
        flops = 6 * sum(p.numel() for n, p in student.named_parameters() if "language_model.layers." in n)
        recipe = Recipe(job, module, processor, dtype, export_fn, flops)
        if kind == "kl":
            recipe.logits = StoredLogits(job.logits, job.seed)
    if log:
        log(f"{job.stage}: trainable parameters " + ", ".join(f"{g} {n:,}" for g, n in counts.items()))
    return recipe


def build_student(job: TrainJob, dtype: torch.dtype, device):
    """The previous stage's export, or with `init_weights: random` a student of init's config.json with
    weights drawn from the job's seed, built where it trains (benchmarks: no 9 GB checkpoint on disk)."""
    if job.init_weights == "load":
        return load_student(materialize(job.init), dtype).to(device)
    if job.init_weights != "random":
        raise ValueError(f"init_weights {job.init_weights!r}: use load or random")
    from model import InfiniteVLForConditionalGeneration

    config = InfiniteVLConfig.from_pretrained(materialize(job.init))
    torch.manual_seed(job.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            student = InfiniteVLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return student.train()


def enable_checkpointing(model, every_n_layers: int = 1) -> None:
    """Activation checkpointing of the model's blocks (vision tower and decoder, in that order), every n-th
    block only for n > 1: the blocks left out keep their activations and are not recomputed."""
    model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every_n_layers)


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
