"""The byte layout of one covered position: top-k token ids, their log-probs, and the mass left outside.

    | k token ids, `index_bits` each, bit-packed | k log-probs (fp16 | bf16 | fp32) | log tail mass (fp32) |

Token ids take ceil(log2(vocab)) bits, 18 for Qwen's 151,936: packing them saves 14 of every 32 bits.
They stay in rank order (largest logit first), so a reader never sorts. The values are log-probabilities
normalised over the full vocabulary, so the KL loss needs no other constant; the tail is
log(1 - top-k mass), computed from the logits outside the top-k (not by subtraction, which loses a tail
below fp32's epsilon), so a loss can give the rest of the vocabulary its due weight.

At k = 64, vocab 151,936, fp16: 144 + 128 + 4 = 276 bytes per position.

Encoding and decoding are plain tensor ops, so they run where the logits are (the GPU) and only the
packed bytes cross to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

VALUE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class SparseEncoding:
    k: int
    vocab_size: int
    values: str = "fp16"

    def __post_init__(self):
        if self.values not in VALUE_DTYPES:
            raise ValueError(f"values must be one of {sorted(VALUE_DTYPES)}, got {self.values!r}")
        if not 0 < self.k <= self.vocab_size:
            raise ValueError(f"top-k {self.k} must be in [1, vocab size {self.vocab_size}]")

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.vocab_size)))

    @property
    def index_bytes(self) -> int:
        return math.ceil(self.k * self.index_bits / 8)

    @property
    def value_bytes(self) -> int:
        return self.k * VALUE_DTYPES[self.values].itemsize

    @property
    def bytes_per_position(self) -> int:
        return self.index_bytes + self.value_bytes + 4

    def describe(self) -> dict:
        return {"k": self.k, "vocab_size": self.vocab_size, "index_bits": self.index_bits, "values": self.values,
                "value_kind": "log_prob", "tail": "fp32 log(1 - topk_mass)",
                "bytes_per_position": self.bytes_per_position}

    def encode(self, indices: torch.Tensor, log_probs: torch.Tensor, log_tail: torch.Tensor) -> torch.Tensor:
        """[N, k] ids, [N, k] log-probs, [N] log tail → [N, bytes_per_position] uint8, on their device."""
        n = indices.shape[0]
        if n == 0:
            return torch.zeros(0, self.bytes_per_position, dtype=torch.uint8, device=indices.device)
        packed = _pack_bits(indices.long(), self.index_bits, self.index_bytes)
        values = log_probs.to(VALUE_DTYPES[self.values]).contiguous().view(torch.uint8).reshape(n, -1)
        tail = log_tail.float().contiguous().view(torch.uint8).reshape(n, 4)
        return torch.cat([packed, values, tail], dim=1)

    def decode(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[N, bytes_per_position] uint8 → ([N, k] int64 ids, [N, k] fp32 log-probs, [N] fp32 log tail)."""
        if data.ndim != 2 or data.shape[1] != self.bytes_per_position:
            raise ValueError(f"expected [N, {self.bytes_per_position}] bytes, got {tuple(data.shape)}")
        if len(data) == 0:
            return (torch.zeros(0, self.k, dtype=torch.long), torch.zeros(0, self.k), torch.zeros(0))
        a, b = self.index_bytes, self.index_bytes + self.value_bytes
        indices = _unpack_bits(data[:, :a], self.index_bits, self.k)
        values = data[:, a:b].contiguous().view(VALUE_DTYPES[self.values]).float()
        tail = data[:, b:].contiguous().view(torch.float32)[:, 0]
        return indices, values, tail


def _pack_bits(values: torch.Tensor, bits: int, nbytes: int) -> torch.Tensor:
    """[N, k] non-negative ints < 2**bits → [N, nbytes] uint8, little-endian bit order, zero-padded."""
    n = values.shape[0]
    shifts = torch.arange(bits, device=values.device)
    stream = ((values[..., None] >> shifts) & 1).to(torch.uint8).reshape(n, -1)
    stream = torch.nn.functional.pad(stream, (0, nbytes * 8 - stream.shape[1]))
    weights = (1 << torch.arange(8, device=values.device)).to(torch.uint8)
    return (stream.reshape(n, nbytes, 8) * weights).sum(-1, dtype=torch.uint8)


def _unpack_bits(data: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    n = data.shape[0]
    shifts = torch.arange(8, device=data.device)
    stream = ((data[..., None].long() >> shifts) & 1).reshape(n, -1)[:, :k * bits]
    weights = 1 << torch.arange(bits, device=data.device, dtype=torch.long)
    return (stream.reshape(n, k, bits) * weights).sum(-1)
