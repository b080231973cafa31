"""CUDA graphs for decode steps and per-frame prefill.

A decode step of the 3B student is 36 layers of ~15 small kernels each: at batch 1 the GPU mostly waits
for the CPU to launch them (a Gated DeltaNet step measured ~0.09 ms, mostly launch overhead). A CUDA
graph records the launches once and replays them with one call. A replay reads and writes the addresses
it was captured with, so everything a step touches lives in buffers allocated once:

- the inputs (token ids or embeddings, M-RoPE positions, the count of tokens seen) are static tensors
  the caller fills before a replay; a decode graph advances its positions and count itself;
- the cache is allocated up front at its final size (ring buffers and Gated DeltaNet states are fixed
  size), and every layer's new state is copied back into those same tensors.

The model's own decoder forward cannot be captured as it is: a sliding layer builds its key positions
from a Python int (`torch.arange(offset, offset + T)`, a constant once captured), and a Gated DeltaNet
layer rebinds `cache.conv` / `cache.state` to fresh tensors every step. `forward_in_place` is that forward
with those two points done the capturable way. It has no host syncs (no `.item()`, no `bool(tensor)`, no
data-dependent shapes), so it is the body of every graph here, and on CPU it runs eagerly (tested
against the model's forward).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .cache import InfiniteVLCache, RecurrentStateCache, SlidingWindowCache
from .layers.attention import window_mask
from .modeling import add_deepstack
from .packed import pack_projections

WARMUP_STEPS = 3  # eager runs before capture: Triton autotuning, cuBLAS workspaces, lazy inits


# -- the capturable forward ------------------------------------------------------------------------------------

def allocate_cache(model, batch_size: int, device=None, dtype=None) -> InfiniteVLCache:
    """An empty cache with every tensor allocated at its final size (what a graph needs before capture)."""
    cache = InfiniteVLCache(model.config)
    param = next(model.parameters())
    device, dtype = device or param.device, dtype or param.dtype
    for layer, state in zip(model.model.language_model.layers, cache.layers):
        mixer = layer.self_attn
        if isinstance(state, SlidingWindowCache):
            like = torch.empty(batch_size, mixer.num_kv_heads, 0, mixer.head_dim, device=device, dtype=dtype)
            state.allocate(like, like)
        else:  # every linear mixer knows its own conv and state shapes
            mixer.allocate_state(state, batch_size, device, dtype)
    return cache


def copy_cache_(dst: InfiniteVLCache, src: InfiniteVLCache) -> None:
    """Copies the state of `src` into the tensors `dst` already holds (so a graph over `dst` sees it)."""
    for d, s in zip(dst.layers, src.layers):
        if isinstance(d, SlidingWindowCache):
            if s.keys is None:
                d.pos.fill_(-1)
                d.valid.zero_()
                continue
            for a, b in ((d.keys, s.keys), (d.values, s.values), (d.pos, s.pos), (d.valid, s.valid)):
                if a.shape != b.shape:
                    raise ValueError(f"cache shapes differ: {tuple(b.shape)} into {tuple(a.shape)} "
                                     "(a decoder serves one batch size)")
                a.copy_(b)
        elif s.state is None:
            d.state.zero_()
            for t in d.conv.values():
                t.zero_()
        else:
            for name, t in d.conv.items():
                t.copy_(s.conv[name])
            d.state.copy_(s.state)
    dst.seen = src.seen


def forward_in_place(model, cache: InfiniteVLCache, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                     offset, deepstack=None) -> torch.Tensor:
    """The decoder over new tokens that follow `offset` (int or 0-d tensor) tokens already in `cache`;
    returns the final hidden states [B, T, hidden]. New state goes into the cache's existing tensors; the
    caller advances `cache.seen` (a Python int, which a replay cannot do). `deepstack`: (visual mask,
    levels) of the new tokens where the family adds DeepStack features (model.modeling.add_deepstack)."""
    text = model.model.language_model
    position_embeddings = text.rotary_emb(inputs_embeds, position_ids)
    h = inputs_embeds
    for i, (layer, state) in enumerate(zip(text.layers, cache.layers)):
        x = layer.input_layernorm(h)
        if isinstance(state, SlidingWindowCache):
            x = _sliding_attention(layer.self_attn, x, position_embeddings, state, offset)
        else:
            x = _linear_mixer(layer.self_attn, x, state)
        h = add_deepstack(layer.feed_forward(x, h), deepstack, i)
    return text.norm(h)


def _sliding_attention(attn, x, position_embeddings, ring: SlidingWindowCache, offset):
    B, T, _ = x.shape
    q, k, v, gate = attn.project(x, position_embeddings)
    pos = torch.arange(T, device=x.device) + offset  # a tensor offset stays live across replays
    valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
    k_ctx, v_ctx, kpos, kvalid = ring.extend(k, v, pos, valid)
    mask = window_mask(pos, kpos, attn.window, kvalid)
    o = F.scaled_dot_product_attention(q, k_ctx.to(q.dtype), v_ctx.to(q.dtype), attn_mask=mask,
                                       enable_gqa=attn.num_kv_heads != attn.num_heads)
    return attn.output(o, gate)


def _linear_mixer(mixer, x, state: RecurrentStateCache):
    conv, recurrent = state.conv, state.state
    out = mixer(x, None, None, state)  # rebinds state.conv / state.state to new tensors
    for name, t in conv.items():
        t.copy_(state.conv[name])
    recurrent.copy_(state.state)
    state.conv, state.state = conv, recurrent
    return out


# -- graphs ----------------------------------------------------------------------------------------------------

def graphs_available(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def capture(body):
    """(graph, its output): `body` run WARMUP_STEPS times eagerly on a side stream, then captured once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = body()
    return graph, output


class GraphedForward:
    """`forward_in_place` over `tokens` new tokens for `batch_size` rows of `cache`, captured once and
    replayed (or run eagerly where there is no CUDA device). Inputs are either token ids (decode: the
    embedding lookup is captured too) or embeddings (frames: the vision tower ran before). With
    `advance_positions`, each run moves the positions on by `tokens` (text continues 1-D)."""

    def __init__(self, model, cache: InfiniteVLCache, batch_size: int, tokens: int, *, from_ids: bool,
                 logits: bool, advance_positions: bool, use_graph: bool, deepstack_levels: int = 0):
        pack_projections(model)  # before any capture: a graph keeps the weight addresses it saw
        param = next(model.parameters())
        self.model, self.cache, self.tokens = model, cache, tokens
        self.from_ids, self.want_logits, self.advance_positions = from_ids, logits, advance_positions
        self.ids = torch.zeros(batch_size, tokens, dtype=torch.long, device=param.device)
        self.embeds = torch.zeros(batch_size, tokens, model.config.text_config.hidden_size, dtype=param.dtype,
                                  device=param.device)
        self.positions = torch.zeros(3, batch_size, tokens, dtype=torch.long, device=param.device)
        self.offset = torch.zeros((), dtype=torch.long, device=param.device)
        # DeepStack features of the new tokens, dense (zeros off the visual positions): see add_deepstack
        self.deepstack = [torch.zeros_like(self.embeds) for _ in range(deepstack_levels)]
        self.graph = None
        self.output = None
        if use_graph:
            self._capture()

    def _body(self) -> torch.Tensor:
        embeds = self.model.model.language_model.embed_tokens(self.ids) if self.from_ids else self.embeds
        deepstack = (None, self.deepstack) if self.deepstack else None
        h = forward_in_place(self.model, self.cache, embeds, self.positions, self.offset, deepstack)[:, -1]
        self.offset += self.tokens
        if self.advance_positions:
            self.positions += self.tokens
        return self.model.lm_head(h) if self.want_logits else h

    @torch.no_grad()
    def _capture(self) -> None:
        """Warm up on a side stream, then capture. Warm-up runs write into the cache and counters (a capture
        does not), so their contents are saved first and put back after."""
        saved_cache, saved = self.cache.copy(), (self.offset.clone(), self.positions.clone())
        self.graph, self.output = capture(self._body)
        copy_cache_(self.cache, saved_cache)
        self.offset.copy_(saved[0])
        self.positions.copy_(saved[1])

    @torch.no_grad()
    def run(self) -> torch.Tensor:
        """One step over the static inputs; the returned tensor is overwritten by the next run."""
        if self.graph is not None:
            self.graph.replay()
            out = self.output
        else:
            out = self._body()
        self.cache.seen += self.tokens
        return out


class CUDAGraphDecoder:
    """Greedy or sampled decoding one token at a time for a fixed batch size, replaying a captured step.

    The decoder owns its cache (allocated once); `load` copies another cache's state into it, so decoding
    never disturbs the cache it started from (a stream asks questions this way). On a machine without
    CUDA it says so once and runs the same step eagerly."""

    def __init__(self, model, batch_size: int = 1, use_graph: bool | None = None):
        device = next(model.parameters()).device
        if use_graph is None:
            use_graph = graphs_available(device)
        elif use_graph and not graphs_available(device):
            warnings.warn(f"CUDA graphs need a CUDA device; the model is on {device}, decoding eagerly",
                          stacklevel=2)
            use_graph = False
        self.model, self.batch_size, self.use_graph = model, batch_size, use_graph
        self.cache = allocate_cache(model, batch_size)
        self.step_graph = GraphedForward(model, self.cache, batch_size, 1, from_ids=True, logits=True,
                                         advance_positions=True, use_graph=use_graph)

    @property
    def device(self):
        return self.step_graph.ids.device

    def load(self, cache: InfiniteVLCache, next_positions: torch.Tensor | int) -> None:
        """Start from `cache`'s state; `next_positions` ([3, B], [B] or an int) is the M-RoPE position of
        the next token (after images or video it is not the count of tokens seen)."""
        copy_cache_(self.cache, cache)
        self._set_counters(next_positions)

    def _set_counters(self, next_positions) -> None:
        g = self.step_graph
        g.offset.fill_(self.cache.seen)
        p = torch.as_tensor(next_positions, device=self.device)
        g.positions.copy_(p.view(*p.shape, 1).expand_as(g.positions) if p.ndim < 3 else p)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text tokens [B, T] continuing the loaded state, run eagerly over the decoder's cache (prompts vary
        in length; a graph has one shape). Returns the logits of the last token [B, vocab]."""
        g = self.step_graph
        T = input_ids.shape[1]
        start = g.positions[..., :1]
        positions = start + torch.arange(T, device=self.device)
        embeds = self.model.model.language_model.embed_tokens(input_ids.to(self.device))
        h = forward_in_place(self.model, self.cache, embeds, positions, g.offset)[:, -1]
        self.cache.seen += T
        g.offset += T
        g.positions += T
        return self.model.lm_head(h)

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Feeds one token per row ([B] or [B, 1]); returns next-token logits [B, vocab] (a static buffer:
        clone it to keep it past the next step)."""
        self.step_graph.ids.copy_(input_ids.view(self.batch_size, 1))
        return self.step_graph.run()


# -- the vision tower ------------------------------------------------------------------------------------------
#
# Qwen2.5-VL's vision tower runs window attention. With SDPA, transformers splits the windows in Python
# (`cu_seqlens.tolist()`, a host sync in each of the 32 blocks) and launches one attention per window:
# ~2,000 launches for one 448×448 frame, more time than the frame's compute. Flash-style implementations
# get the packed tensors and `cu_seqlens` instead; transformers picks that calling convention for every
# attention name containing "flash". So the attention registered here takes it and runs all windows in
# one SDPA call with a block-diagonal mask, no host sync, and the per-grid index tensors are computed once
# and passed in (transformers' precomputed-kwargs path): the whole tower can then be captured.

VISION_ATTENTION = "flash_varlen_sdpa"


def varlen_sdpa(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                max_length_q=None, **kwargs):
    """Attention within the segments `cu_seq_lens_q` bounds, for q/k/v [1, heads, tokens, dim]; returns
    [1, tokens, heads, dim] like every transformers attention function.

    Segments of one length (a frame whose sides are multiples of the window: 448² has 16 windows of 64
    patches, and the full-attention blocks one segment) run as a batch of unmasked attentions, which takes
    the flash kernels; the count of segments and the longest (a host int) say so without a host sync."""
    n = query.shape[2]
    count = cu_seq_lens_q.shape[0] - 1
    if isinstance(max_length_q, int) and max_length_q * count == n:
        heads, dim = query.shape[1], query.shape[-1]
        windows = lambda t: t[0].view(heads, count, max_length_q, -1).transpose(0, 1)  # noqa: E731
        out = F.scaled_dot_product_attention(windows(query), windows(key), windows(value), dropout_p=dropout,
                                             scale=scaling)  # [count, heads, length, dim]
        return out.permute(0, 2, 1, 3).reshape(1, n, heads, out.shape[-1]), None
    if n > MASKED_MAX_TOKENS:
        return _by_segment_length(query, key, value, cu_seq_lens_q, scaling, dropout), None
    bounds = cu_seq_lens_q[1:].to(query.device)
    segment = torch.searchsorted(bounds, torch.arange(n, device=query.device, dtype=bounds.dtype), right=True)
    mask = segment[:, None] == segment[None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


# Above this many patches a block-diagonal mask (tokens² bools) costs more than it saves: a training batch of
# 64 recall streams holds ~250K patches. There the segments are grouped by length instead (a host read of the
# lengths: training and evaluation only; a captured frame is far below it).
MASKED_MAX_TOKENS = 4096


def _by_segment_length(query, key, value, cu_seqlens, scaling, dropout):
    """One unmasked SDPA per distinct segment length, the segments of that length as its batch: a video's frames
    and a picture's windows come in a few lengths, so a batch of thousands of segments takes a few calls."""
    heads, n, dim = query.shape[1], query.shape[2], value.shape[-1]
    starts, lengths = cu_seqlens[:-1].to(query.device), (cu_seqlens[1:] - cu_seqlens[:-1]).to(query.device)
    out = query.new_empty(heads, n, dim)
    for length in torch.unique(lengths).tolist():
        index = (starts[lengths == length][:, None] + torch.arange(length, device=query.device)).reshape(-1)
        pick = lambda t: t[0][:, index].view(heads, -1, length, t.shape[-1]).transpose(0, 1)  # noqa: E731
        part = F.scaled_dot_product_attention(pick(query), pick(key), pick(value), dropout_p=dropout, scale=scaling)
        out[:, index] = part.transpose(0, 1).reshape(heads, -1, dim)
    return out.transpose(0, 1).unsqueeze(0)  # [1, tokens, heads, dim]


AttentionInterface.register(VISION_ATTENTION, varlen_sdpa)


@contextlib.contextmanager
def vision_attention(visual):
    """The vision tower's config names our attention while inside (the config is the model's, shared)."""
    config = visual.config
    saved = config._attn_implementation
    config._attn_implementation = VISION_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = saved


def grouped_vision(model):
    """vision_attention for the tower of `model` (an inner model's `.visual`, or a model's `.model.visual`): where
    training, the teacher-logit stage and evaluation run whole packed rows and batches, whose windows and frames
    transformers would run one launch and one host sync each. A model without a tower: nothing changes."""
    visual = getattr(model, "visual", None)
    if visual is None:
        visual = getattr(getattr(model, "model", None), "visual", None)
    return vision_attention(visual) if visual is not None else contextlib.nullcontext()


def vision_index_tensors(visual, grid_thw: torch.Tensor) -> dict:
    """What the vision forward derives from the grid on the host, computed once for one grid."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    device = next(visual.parameters()).device
    grid = grid_thw.to(device)
    cu_seqlens = get_vision_cu_seqlens(grid).to(device)
    window_index, cu_window_seqlens = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size,
                                                              visual.patch_size)
    longest = lambda cu: int((cu[1:] - cu[:-1]).max())  # noqa: E731
    return {"position_ids": get_vision_position_ids(grid, visual.spatial_merge_size).to(device),
            "cu_seqlens": cu_seqlens, "max_seqlen": longest(cu_seqlens), "window_index": window_index.to(device),
            "cu_window_seqlens": cu_window_seqlens.to(device), "max_window_seqlen": longest(cu_window_seqlens)}


class GraphedVision:
    """The vision tower over patches of one grid (pixel_values_videos of one chunk) → merged visual tokens
    [tokens, hidden], captured once and replayed (or run eagerly, sync-free, without CUDA)."""

    def __init__(self, visual, grid_thw: torch.Tensor, use_graph: bool):
        self.visual, self.grid = visual, grid_thw.to(next(visual.parameters()).device)
        self.index = vision_index_tensors(visual, grid_thw)
        self.use_graph = use_graph
        self.pixels = self.graph = self.output = None

    def _body(self) -> torch.Tensor:
        with vision_attention(self.visual):
            return self.visual(self.pixels, grid_thw=self.grid, **dict(self.index)).pooler_output

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Merged tokens for `pixels`; a replay's output is overwritten by the next call."""
        pixels = pixels.to(self.grid.device, self.visual.dtype)
        if self.pixels is None:
            self.pixels = pixels.clone()
            if self.use_graph:
                self._capture()
        else:
            self.pixels.copy_(pixels)
        if self.graph is None:
            return self._body()
        self.graph.replay()
        return self.output

    def _capture(self) -> None:
        self.graph, self.output = capture(self._body)
