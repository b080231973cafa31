"""Constant-size inference state.

Sliding layers keep a ring buffer of the last W keys/values (a query attends to itself plus the W-1
tokens before it); linear layers (`config.linear_mixer`: Gated DeltaNet, GLA, Mamba2, KDA) keep their recurrent
state and the inputs of each short convolution (GDN, GLA and KDA: "q", "k", "v" [B, C, K] and a [B, HV, Dk, Dv]
state; Mamba2: "xBC" and a [B, H, N, P] state; each mixer's `allocate_state` says). A conv state holds the last K = conv_size inputs, newest last,
of which only K-1 are ever read: fla's layout, so that its decode kernel updates the state in place.
Nothing grows with the number of tokens seen.

All rows of a batch share one token timeline (generation pads on the left), so slot positions are shared
and validity (padding) is kept per row.

Speculative decoding (transformers' `generate(assistant_model=...)` and `prompt_lookup_num_tokens=...`) feeds
draft tokens and then takes back the rejected ones: `activate_past_recording(recurrent_states_to_keep=k)` makes
every layer keep what it needs to undo its last k tokens at least, and `crop(-r)` undoes the last r. A ring keeps,
for each recent write, what the slot held before it (`RingJournal`), so undoing restores the slots in place. A
linear layer cannot subtract a token from its recurrent state: it keeps a checkpoint of its state and the layer
inputs of the tokens after it (`LinearJournal`); undoing drops the rejected inputs and returns to the checkpoint,
and the accepted ones are fed again in front of the layer's next new tokens (one mixer call). Both journals hold at
most `2k + 2` tokens, whatever the number of tokens generated: the rollback buffer is bounded by the draft length.
"""

from __future__ import annotations

import copy

import torch


def journal_limit(depth: int) -> int:
    """The most tokens a journal holds for a guaranteed rollback `depth`: room for one more draft window and
    its bonus token past the guaranteed depth, so a linear layer folds its checkpoint forward about once
    every second verification rather than at each."""
    return 2 * depth + 2


class _Journal:
    """A layer's record of its recent tokens, kept for a guaranteed rollback of `depth` (raised, never lowered,
    as drafts lengthen) within `limit` tokens."""

    def __init__(self, depth: int):
        self.depth = depth

    @property
    def limit(self) -> int:
        return journal_limit(self.depth)


class _Recording:
    """What a layer cache answers while generate() speculates: it journals its tokens (`journal_type`) once
    recording, and says how many of the last tokens it can take back."""

    journal_type: type[_Journal]
    journal: _Journal | None

    def record(self, depth: int) -> None:
        if self.journal is None:
            self.journal = self.journal_type(depth)
        self.journal.depth = max(self.journal.depth, depth)

    def undoable(self) -> int:
        return len(self.journal) if self.journal is not None else 0


class RingJournal(_Journal):
    """What each recent write into a ring replaced: per token, its slot and the slot's key, value, position
    and validity before the write, oldest first; the last `limit` tokens are kept."""

    def __init__(self, depth: int):
        super().__init__(depth)
        self.records: list[tuple] = []  # (slots [n], keys [B,H,n,D], values, pos [n], valid [B,n])

    def __len__(self) -> int:
        return sum(r[0].numel() for r in self.records)

    def add(self, record: tuple) -> None:
        self.records.append(record)
        extra = len(self) - self.limit
        while extra > 0:
            n = self.records[0][0].numel()
            if n <= extra:
                self.records.pop(0)
                extra -= n
            else:
                self.records[0] = _slice_record(self.records[0], extra, n)
                extra = 0

    def take_last(self, r: int) -> tuple:
        """Removes the last `r` tokens' entries and returns them as one record, oldest first."""
        taken = []
        while r > 0:
            rec = self.records[-1]
            n = rec[0].numel()
            if n <= r:
                taken.append(self.records.pop())
                r -= n
            else:
                taken.append(_slice_record(rec, n - r, n))
                self.records[-1] = _slice_record(rec, 0, n - r)
                r = 0
        taken.reverse()
        return tuple(torch.cat(parts, dim) for parts, dim in zip(zip(*taken), (0, 2, 2, 0, 1)))

    def tensors(self):
        return [t for rec in self.records for t in rec]

    def map_batch(self, fn) -> None:
        self.records = [(s, fn(k), fn(v), p, fn(ok)) for s, k, v, p, ok in self.records]


def _slice_record(rec, a: int, b: int) -> tuple:
    slots, k, v, pos, valid = rec
    return slots[a:b], k[:, :, a:b], v[:, :, a:b], pos[a:b], valid[:, a:b]


class SlidingWindowCache(_Recording):
    """The last W keys/values: W slots, so that a single new token can be written first and then attend
    to the ring alone (the whole window, itself included, with no copy); a chunk of several tokens attends
    to the ring as it was followed by the chunk."""

    journal_type = RingJournal

    def __init__(self, window: int):
        self.window = window
        self.size = max(window, 1)
        self.keys = self.values = self.pos = self.valid = None
        self.journal: RingJournal | None = None

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
        if self.journal is not None:
            self.journal.add(self._overwritten(k, v, pos, valid, min(k.shape[2], self.journal.limit)))
        keep = min(k.shape[2], self.size)
        k, v, pos, valid = k[:, :, -keep:], v[:, :, -keep:], pos[-keep:], valid[:, -keep:]
        slots = pos % self.size
        self.keys[:, :, slots] = k.to(self.keys.dtype)
        self.values[:, :, slots] = v.to(self.values.dtype)
        self.pos[slots] = pos
        self.valid[:, slots] = valid

    def _overwritten(self, k, v, pos, valid, n: int) -> tuple:
        """For each of the last `n` of the new tokens (positions are consecutive), what its slot holds just
        before it is written: a token of this same chunk one ring length earlier, else the ring as it is now."""
        T = k.shape[2]
        idx = torch.arange(T - n, T, device=pos.device)
        slots = pos[T - n:] % self.size
        src = idx - self.size
        inside = src >= 0
        src = src.clamp(min=0)
        pick = lambda new, old: torch.where(inside.view(1, 1, -1, 1), new, old)  # noqa: E731
        return (slots, pick(k[:, :, src].to(self.keys.dtype), self.keys[:, :, slots]),
                pick(v[:, :, src].to(self.values.dtype), self.values[:, :, slots]),
                torch.where(inside, pos[src], self.pos[slots]),
                torch.where(inside.view(1, -1), valid[:, src], self.valid[:, slots]))

    # -- speculative decoding ------------------------------------------------------------------------------------
    def rollback(self, r: int) -> None:
        """Undoes the last `r` writes. Undone oldest first, a slot takes what it held before the earliest undone
        write into it: among the undone tokens only the first W (distinct slots) decide."""
        slots, k, v, pos, valid = self.journal.take_last(r)
        n = min(r, self.size)
        slots = slots[:n]
        self.keys[:, :, slots] = k[:, :, :n]
        self.values[:, :, slots] = v[:, :, :n]
        self.pos[slots] = pos[:n]
        self.valid[:, slots] = valid[:, :n]

    @property
    def seen_any(self) -> bool:
        return self.keys is not None

    def tensors(self):
        own = [t for t in (self.keys, self.values, self.pos, self.valid) if t is not None]
        return own + (self.journal.tensors() if self.journal is not None else [])

    def map_batch(self, fn) -> None:
        if self.keys is not None:
            self.keys, self.values, self.valid = fn(self.keys), fn(self.values), fn(self.valid)
        if self.journal is not None:
            self.journal.map_batch(fn)


class LinearJournal(_Journal):
    """A linear layer's way back: a checkpoint of its state and the layer inputs of the (at most `limit`) tokens
    after it. `applied` says whether the live state is after those tokens (True) or still at the checkpoint
    (False, after a rollback: they are fed again before the next new tokens)."""

    def __init__(self, depth: int):
        super().__init__(depth)
        self.checkpoint: RecurrentStateCache | None = None
        self.inputs: torch.Tensor | None = None  # [B, n, hidden]
        self.masks: torch.Tensor | None = None  # [B, n] bool, None while every token is real
        self.applied = True

    def __len__(self) -> int:
        return 0 if self.inputs is None else self.inputs.shape[1]

    def tensors(self):
        held = [t for t in (self.inputs, self.masks) if t is not None]
        return held + (self.checkpoint.tensors() if self.checkpoint is not None else [])

    def map_batch(self, fn) -> None:
        self.inputs = None if self.inputs is None else fn(self.inputs)
        self.masks = None if self.masks is None else fn(self.masks)
        if self.checkpoint is not None:
            self.checkpoint.map_batch(fn)


def _cat_masks(a, b, na: int, nb: int, like: torch.Tensor):
    if a is None and b is None:
        return None
    ones = lambda n: torch.ones(like.shape[0], n, dtype=torch.bool, device=like.device)  # noqa: E731
    return torch.cat([ones(na) if a is None else a.bool(), ones(nb) if b is None else b.bool()], 1)


def _cut(x, mask, a: int, b: int):
    return x[:, a:b], (None if mask is None else mask[:, a:b])


class RecurrentStateCache(_Recording):
    """A linear mixer's state: its conv inputs by name and one recurrent state tensor (fp32)."""

    journal_type = LinearJournal

    def __init__(self):
        self.conv: dict[str, torch.Tensor] = {}
        self.state: torch.Tensor | None = None
        self.journal: LinearJournal | None = None

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

    def snapshot(self) -> "RecurrentStateCache":
        """An independent copy of the state (no journal)."""
        out = RecurrentStateCache()
        out.conv = {k: v.clone() for k, v in self.conv.items()}
        out.state = None if self.state is None else self.state.clone()
        return out

    def restore(self, saved: "RecurrentStateCache") -> None:
        if saved.state is None:
            self.conv, self.state = {}, None
        else:
            self.store(saved.conv, saved.state)

    def run(self, mix, x: torch.Tensor, mask: torch.Tensor | None):
        """The mixer over new tokens: `mix(x, mask, state)` runs it from `state` (updating it) and returns its
        output. While recording, the tokens' inputs join the journal, whose checkpoint moves forward (one more
        mixer call) once more than `limit` tokens would follow it, to just before the last `depth` of them."""
        j = self.journal
        if j is None:
            return mix(x, mask, self)
        if j.checkpoint is None:
            j.checkpoint = self.snapshot()
        n, T = len(j), x.shape[1]
        inputs = x if j.inputs is None else torch.cat([j.inputs, x.to(j.inputs.dtype)], 1)
        masks = _cat_masks(j.masks, mask, n, T, x)
        fold = n + T - j.depth if n + T > j.limit else 0  # tokens that join the checkpoint
        if not j.applied:  # the live state is at the checkpoint: the journal's tokens go in first
            if fold:
                y_a = mix(*_cut(inputs, masks, 0, fold), self)
                j.checkpoint = self.snapshot()
                y = torch.cat([y_a, mix(*_cut(inputs, masks, fold, n + T), self)], 1)[:, n:]
            else:
                y = mix(inputs, masks, self)[:, n:]
        elif fold >= n:  # the checkpoint moves into the new tokens
            parts = []
            if fold > n:
                parts.append(mix(*_cut(x, mask, 0, fold - n), self))
            j.checkpoint = self.snapshot()
            parts.append(mix(*_cut(x, mask, fold - n, T), self))
            y = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        else:
            if fold:  # the checkpoint moves inside the journal: replayed on a copy, the live state untouched
                scratch = j.checkpoint.snapshot()
                mix(*_cut(j.inputs, j.masks, 0, fold), scratch)
                j.checkpoint = scratch
            y = mix(x, mask, self)
        # copies: a slice would keep the whole of a long prefill's inputs alive
        j.inputs, j.masks = (None if t is None else t.clone() for t in _cut(inputs, masks, fold, n + T))
        j.applied = True
        return y

    # -- speculative decoding ------------------------------------------------------------------------------------
    def rollback(self, r: int) -> None:
        j = self.journal
        keep = len(j) - r
        j.inputs, j.masks = _cut(j.inputs, j.masks, 0, keep)
        self.restore(j.checkpoint)
        j.applied = keep == 0

    def tensors(self):
        own = list(self.conv.values()) + ([self.state] if self.state is not None else [])
        return own + (self.journal.tensors() if self.journal is not None else [])

    def map_batch(self, fn) -> None:
        self.conv = {k: fn(v) for k, v in self.conv.items()}
        if self.state is not None:
            self.state = fn(self.state)
        if self.journal is not None:
            self.journal.map_batch(fn)


class InfiniteVLCache:
    """Per-layer constant-size state plus the count of tokens seen (the position of the next token)."""

    # what transformers' generate() asks before choosing compiled or assisted decoding paths: every layer can
    # take back its recent tokens once recording (assisted decoding and prompt lookup need it)
    is_compileable = False
    is_croppable = True

    def __init__(self, config):
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.layers = [SlidingWindowCache(text.sliding_window) if t == "sliding_attention" else RecurrentStateCache()
                       for t in text.layer_types]
        self.seen = 0
        self.is_linear = [isinstance(layer, RecurrentStateCache) for layer in self.layers]
        self.rollback_depth = 0

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

    # -- speculative decoding: what transformers' assisted decoding calls --------------------------------------
    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs) -> None:
        """From now on every layer can undo at least its last `recurrent_states_to_keep` tokens (the draft length;
        at least 1; a later call can only raise it)."""
        self.rollback_depth = max(self.rollback_depth, int(recurrent_states_to_keep or 0), 1)
        for layer in self.layers:
            layer.record(self.rollback_depth)

    def is_recording_past(self, layer_idx: int | None = None) -> bool:
        return self.rollback_depth > 0

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return self.rollback_depth

    def crop(self, tokens_to_remove: int) -> None:
        """Takes back the last `-tokens_to_remove` tokens (transformers' convention: a number ≤ 0; 0 is a no-op).
        The layers return exactly to the state they had before those tokens."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): InfiniteVLCache takes back tokens with a negative count "
                             f"(crop(-n) removes the last n), as transformers' caches do")
        r = -int(tokens_to_remove)
        if r == 0:
            return
        if not self.rollback_depth:
            raise RuntimeError(f"crop({tokens_to_remove}): this cache is not recording its past; call "
                               "activate_past_recording(recurrent_states_to_keep=<draft length>) before the tokens "
                               "that may be taken back")
        short = sorted({layer.undoable() for layer in self.layers if layer.undoable() < r})
        if short:
            raise ValueError(f"crop({tokens_to_remove}): the layers can take back only {short[0]} of the last tokens "
                             f"(recording depth {self.rollback_depth}); a draft longer than the depth given to "
                             "activate_past_recording (e.g. num_assistant_tokens_schedule='heuristic' growing it) "
                             "needs a larger recurrent_states_to_keep")
        for layer in self.layers:
            layer.rollback(r)
        self.seen -= r

    # -- batch edits (beam search, batched generation) ---------------------------------------------------------
    def _map_batch(self, fn) -> None:
        for layer in self.layers:
            layer.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])
