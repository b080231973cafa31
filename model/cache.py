"""Constant-size inference state.

Sliding layers keep a ring buffer of the last W keys/values (a query attends to itself plus the W-1
tokens before it); linear layers (`config.linear_mixer`: Gated DeltaNet, GLA, Mamba2, KDA) keep their recurrent
state and the inputs of each short convolution (GDN, GLA and KDA: "q", "k", "v" [B, C, K] and a [B, HV, Dk, Dv]
state; Mamba2: "xBC" and a [B, H, N, P] state; each mixer's `allocate_state` says). A conv state holds the last K = conv_size inputs, newest last,
of which only K-1 are ever read: fla's layout, so that its decode kernel updates the state in place.
Nothing grows with the number of tokens seen.

All rows of a batch share one token timeline (generation pads on the left), so slot positions are shared
and validity (padding) is kept per row.
"""

from __future__ import annotations

import copy

import torch


class SlidingWindowCache:
    """The last W keys/values: W slots, so that a single new token can be written first and then attend
    to the ring alone (the whole window, itself included, with no copy); a chunk of several tokens attends
    to the ring as it was followed by the chunk."""

    def __init__(self, window: int):
        self.window = window
        self.size = max(window, 1)
        self.keys = self.values = self.pos = self.valid = None

    def allocate(self, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        B, H, _, D = like_k.shape
        self.keys = like_k.new_zeros(B, H, self.size, D)
        self.values = like_v.new_zeros(B, H, self.size, like_v.shape[-1])
        self.pos = torch.full((self.size,), -1, dtype=torch.long, device=like_k.device)
        self.valid = torch.zeros(B, self.size, dtype=torch.bool, device=like_k.device)

    def extend(self, k, v, pos, valid):
        """Stores the new tokens' keys/values and returns what the new tokens attend to: (keys, values,
        their positions, their validity per row), in slot order (attention does not care about order, the
        mask uses absolute positions)."""
        if self.keys is None:
            self.allocate(k, v)
        if k.shape[2] == 1:
            self.update(k, v, pos, valid)
            return self.keys, self.values, self.pos, self.valid & (self.pos >= 0)
        context = (torch.cat([self.keys, k.to(self.keys.dtype)], 2),
                   torch.cat([self.values, v.to(self.values.dtype)], 2),
                   torch.cat([self.pos, pos]), torch.cat([self.valid & (self.pos >= 0), valid], 1))
        self.update(k, v, pos, valid)
        return context

    def update(self, k, v, pos, valid) -> None:
        keep = min(k.shape[2], self.size)
        k, v, pos, valid = k[:, :, -keep:], v[:, :, -keep:], pos[-keep:], valid[:, -keep:]
        slots = pos % self.size
        self.keys[:, :, slots] = k.to(self.keys.dtype)
        self.values[:, :, slots] = v.to(self.values.dtype)
        self.pos[slots] = pos
        self.valid[:, slots] = valid

    @property
    def seen_any(self) -> bool:
        return self.keys is not None

    def tensors(self):
        return [t for t in (self.keys, self.values, self.pos, self.valid) if t is not None]


class RecurrentStateCache:
    """A linear mixer's state: its conv inputs by name and one recurrent state tensor (fp32)."""

    def __init__(self):
        self.conv: dict[str, torch.Tensor] = {}
        self.state: torch.Tensor | None = None

    def store(self, conv: dict[str, torch.Tensor], state: torch.Tensor) -> None:
        """Writes into the tensors already held when shapes allow, so their addresses stay fixed (a captured
        CUDA graph keeps reading the same memory)."""
        if self.state is not None and self.state.shape == state.shape and all(
                k in self.conv and self.conv[k].shape == v.shape for k, v in conv.items()):
            self.state.copy_(state)
            for k, v in conv.items():
                self.conv[k].copy_(v)
            return
        self.conv = {k: v.clone() for k, v in conv.items()}
        self.state = state.clone()

    def tensors(self):
        return list(self.conv.values()) + ([self.state] if self.state is not None else [])


class InfiniteVLCache:
    """Per-layer constant-size state plus the count of tokens seen (the position of the next token)."""

    # what transformers' generate() asks before choosing compiled or assisted decoding paths
    is_compileable = False
    is_croppable = False

    def __init__(self, config):
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.layers = [SlidingWindowCache(text.sliding_window) if t == "sliding_attention" else RecurrentStateCache()
                       for t in text.layer_types]
        self.seen = 0
        self.is_linear = [isinstance(layer, RecurrentStateCache) for layer in self.layers]

    # -- what generate() and the model ask of a cache ----------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def advance(self, n: int) -> None:
        self.seen += n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def copy(self) -> "InfiniteVLCache":
        """An independent copy (e.g. to ask a question without disturbing a stream)."""
        return copy.deepcopy(self)

    def _map_batch(self, fn) -> None:
        for layer in self.layers:
            if isinstance(layer, SlidingWindowCache):
                if layer.keys is not None:
                    layer.keys, layer.values, layer.valid = fn(layer.keys), fn(layer.values), fn(layer.valid)
            else:
                layer.conv = {k: fn(v) for k, v in layer.conv.items()}
                if layer.state is not None:
                    layer.state = fn(layer.state)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])
