"""The teacher as this stage uses it: loaded once, checked against the corpus vocabulary, run on packed
rows, and reduced to top-k log-probs without ever holding a full [T, vocab] logit tensor.

Packed rows, documents kept apart, for a teacher of any family: pipeline/packed_teacher.py says how (the
teacher's own forward given text positions that restart in every document, or its exact student given the
documents' boundaries). tests/test_teacher_logits_packed.py holds this to each document run alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from model.cuda_graphs import grouped_vision

if TYPE_CHECKING:
    from model.processing import InfiniteVLProcessor

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")


class VocabularyMismatch(ValueError):
    """The teacher's vocabulary is not the one the token shards were written with."""


@dataclass
class Teacher:
    model: torch.nn.Module  # what runs the packed rows: the teacher, or its exact student (PackedTeacher)
    processor: "InfiniteVLProcessor"
    source: str
    local_dir: str
    takes_boundaries: bool = False  # `model` is given the documents' boundaries (cu_seqlens)

    @property
    def vocab_size(self) -> int:
        return self.model.config.text_config.vocab_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def inputs(self, examples: list[dict]) -> dict:
        """The model's inputs for loader examples (one packed row each), as one packed row on its device."""
        return packed_inputs(examples, self.device, self.takes_boundaries)

    def identity(self) -> dict:
        return {"path": self.source, "weights_sha256": weights_hash(self.local_dir),
                "vocab_size": self.vocab_size, "dtype": str(self.model.dtype).removeprefix("torch.")}


def load_teacher(source: str, *, device: str | torch.device | None = None, storage_options: dict | None = None,
                 attn_implementation: str = "sdpa") -> Teacher:
    """A teacher checkpoint of any family (its config.json says which) from a local folder or a remote prefix (a
    verified local copy: pipeline.storage.local_dir), set up to run packed rows: bf16 on a GPU, fp32 on the CPU."""
    import model as models
    from model.processing import InfiniteVLProcessor
    from pipeline import storage
    from pipeline.packed_teacher import PackedTeacher

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    local = storage.local_dir(source, storage_options)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    packed = PackedTeacher(models.load_teacher(local, dtype=dtype, attn_implementation=attn_implementation))
    processor = InfiniteVLProcessor.from_pretrained(local)
    return Teacher(packed.model.to(device).eval(), processor, source, local, packed.takes_boundaries)


def weights_hash(local_dir: str) -> str:
    """sha256 over the weight files (names and bytes, in name order): the teacher's identity."""
    digest = hashlib.sha256()
    names = sorted(n for n in os.listdir(local_dir) if n.endswith(WEIGHT_SUFFIXES))
    if not names:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {local_dir}")
    for name in names:
        digest.update(name.encode() + b"\0")
        with open(os.path.join(local_dir, name), "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def check_vocabulary(teacher: Teacher, data_manifest: dict) -> None:
    """Raises VocabularyMismatch unless the teacher's token ids mean what the shards' token ids mean."""
    from pipeline.data.tokenize import load_processor, processor_fingerprint

    config, tok = teacher.model.config, teacher.processor.tokenizer
    if len(tok) > teacher.vocab_size:
        raise VocabularyMismatch(f"the teacher's tokenizer has {len(tok)} tokens but its LM head only "
                                 f"{teacher.vocab_size}: {teacher.source} is not a consistent checkpoint")
    for name in ("image_token_id", "video_token_id"):
        if getattr(config, name) != getattr(teacher.processor, name):
            raise VocabularyMismatch(f"{teacher.source}: config {name} {getattr(config, name)} differs from its "
                                     f"processor's {getattr(teacher.processor, name)}")
    if data_manifest.get("processor_fingerprint") == processor_fingerprint(teacher.processor):
        return
    # Same vocabulary, other serialisation (a tokenizer saved and reloaded gains a normaliser) is fine:
    # the stored ids only need to name the same tokens.
    data_processor_name = data_manifest.get("config", {}).get("processor")
    try:
        data_processor = load_processor(data_processor_name)
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot vouch for the ids
        raise VocabularyMismatch(
            f"the shards were tokenized by processor {data_processor_name!r} (fingerprint "
            f"{data_manifest.get('processor_fingerprint')}), which differs from the teacher's "
            f"({processor_fingerprint(teacher.processor)}) and cannot be loaded to compare vocabularies: {exc}") from None
    ours, theirs = tok.get_vocab(), data_processor.tokenizer.get_vocab()
    if ours != theirs:
        differing = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[:5]
        raise VocabularyMismatch(
            f"the teacher {teacher.source} ({len(ours)} tokens) does not have the vocabulary the shards were "
            f"tokenized with ({data_processor_name!r}, {len(theirs)} tokens); first differing (token, id): "
            f"{differing}. Rebuild the data with the teacher's processor or point teacher.source at the right model")


def packed_inputs(examples: list[dict], device: torch.device, takes_boundaries: bool = False) -> dict:
    """Loader examples (one packed row each) → the teacher's inputs for one packed sequence of them all
    (pipeline/packed_teacher.py: position_ids [4, 1, T], and cu_seqlens where the model takes them)."""
    from pipeline.packed_teacher import VISION_INPUTS, packed_model_inputs

    starts = [0] + [int(e["input_ids"].shape[1]) for e in examples][:-1]
    row = {"input_ids": torch.cat([e["input_ids"] for e in examples], dim=1),
           "position_ids": torch.cat([e["position_ids"] for e in examples], dim=-1),
           "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.int32)] +
                                   [e["cu_seqlens"][1:].to(torch.int32) + int(start)
                                    for e, start in zip(examples, torch.tensor(starts).cumsum(0))])}
    for key in VISION_INPUTS:
        parts = [e[key] for e in examples if key in e]
        if parts:
            row[key] = torch.cat(parts)
    return {k: v.to(device, non_blocking=True) for k, v in packed_model_inputs(row, takes_boundaries).items()}


@torch.no_grad()
def sparse_logits(model, inputs: dict, positions: torch.Tensor, k: int, chunk: int = 2048,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of the teacher's next-token distribution at `positions` of the packed row:
    ([N, k] ids in rank order, [N, k] fp32 log-probs, [N] fp32 log of the mass outside the top-k).

    The LM head runs on `chunk` positions at a time, so memory is chunk × vocab, not T × vocab."""
    if positions.numel() == 0:  # nothing supervised in these rows: no forward needed
        dev = positions.device
        return (torch.zeros(0, k, dtype=torch.long, device=dev), torch.zeros(0, k, device=dev),
                torch.zeros(0, device=dev))
    with grouped_vision(model):
        hidden = model.model(**inputs, use_cache=False).last_hidden_state[0]
    hidden = hidden[positions.to(hidden.device)]
    out_idx, out_lp, out_tail = [], [], []
    for h in hidden.split(chunk):
        logits = model.lm_head(h)
        # top-k in the head's own dtype (half the bytes in bf16, the same values)
        values, idx = logits.topk(k, dim=-1)
        # The sums in fp32, shifted by the top-1 logit (the max, which topk already found), so every term
        # is in (0, 1]. Three passes over the chunk instead of torch.logsumexp's five per call; the tail
        # is summed over its own terms, not taken as total minus top-k, which would lose it below fp32's
        # epsilon.
        top = values[:, :1].float()
        terms = torch.sub(logits, top).exp_()
        total = terms.sum(-1)
        rest = terms.scatter_(1, idx, 0.0).sum(-1)
        lse = top[:, 0] + total.log()
        out_idx.append(idx)
        out_lp.append(values.float() - lse[:, None])
        out_tail.append(rest.log() - total.log())
    return torch.cat(out_idx), torch.cat(out_lp), torch.cat(out_tail)


@torch.no_grad()
def full_log_probs(model, inputs: dict, positions: torch.Tensor) -> torch.Tensor:
    """[N, vocab] fp32 log-probs at `positions`: the dense reference the fidelity report compares with."""
    logits = model(**inputs, use_cache=False, logits_to_keep=positions.to(inputs["input_ids"].device)).logits
    return torch.log_softmax(logits[0].float(), dim=-1)
