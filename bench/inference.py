"""Inference speed and memory at full size, in one run on one GPU: a teacher of published shapes (Qwen2.5-VL-3B
by default; `--family`/`--size` for any family and size model/families/ lists) in transformers with SDPA, against
its converted InfiniteVL student, both with random weights in bf16.

    python -m bench.inference            # one H100: 5-8 minutes; writes bench/results/inference.{json,png}
    python -m bench.inference --tiny     # CPU smoke test in seconds (results go to a temporary folder)
    python -m bench.inference --speculative   # only speculative decoding, batch 1 at 128K: inference_speculative.json
    python -m bench.inference --family qwen3_vl --size 4B --add   # adds its rows to bench/results/inference.json
    python -m bench.inference --family qwen3_5 --tiny             # the family's tiny teacher on CPU

`--add` keeps the results file's rows of other teachers and adds this run's, each tagged with `run` (the teacher's
family and size) and the device that measured it; its config and summary go under `families` in the file's config
and summary (bench.common.add_result).

What is measured (one model in memory at a time, so peak memory is that model's):
- prefill: the latency of one prompt of N text tokens (first-token logits only), building the cache. The
  teacher runs it in one pass. The student runs it in one pass (up to `--single-max`) and in chunks
  through its constant-size cache (`--prefill-chunk`), which is how it takes prompts of any length in
  constant memory; the headline takes the faster of the two.
- decode: tokens/s and ms/step at batch 1 and 8 after a context of N tokens. The teacher's KV cache is
  filled with random tensors of the right shape (a real prefill would take minutes at these lengths and
  gives the same step cost); it is allocated once at full length and written in place, as serving
  engines do (transformers' DynamicCache would copy the whole cache every step). Contexts grow until the
  teacher runs out of memory; the student's state has the same size at every context, and is filled
  the same way. The student decodes eagerly (the model's forward) and with CUDA graphs.
- streaming: 448×448 frames pushed one at a time (vision tower, 256 visual tokens each, the decoder over
  them with CUDA graphs), frames per second over the whole stream and how much memory moved.
- where the time goes: one more prefill per model at `--breakdown-at` tokens with every mixer and MLP
  timed (CUDA events), and per-frame milliseconds of patchify / vision tower / decoder in the stream.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

from bench.common import add_result, print_table, write_result
from bench.profiling import kernel_profile, show_profile

K = 1024


def _tokens(x: str) -> int:
    x = x.strip().lower()
    return int(float(x[:-1]) * K) if x.endswith("k") else int(x)


FULL = dict(prefill=[8 * K, 32 * K, 128 * K, 256 * K], contexts=[8 * K, 32 * K, 64 * K, 128 * K, 256 * K, 512 * K],
            batches=[1, 8], decode_steps=32, single_max=256 * K, prefill_chunk=8 * K, stream_frames=2000,
            stream_eager_frames=100, frame_size=448, breakdown_at=128 * K)
DEFAULT_FAMILY, DEFAULT_SIZE = "qwen2_5_vl", "3B"
TINY = dict(prefill=[64, 256], contexts=[64, 256, 1024], batches=[1, 2], decode_steps=4, single_max=64,
            prefill_chunk=64, stream_frames=24, stream_eager_frames=6, frame_size=56, breakdown_at=256)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [_tokens(x) for x in s.split(",") if x.strip()]  # noqa: E731
    p.add_argument("--tiny", action="store_true", help="tiny models on CPU: a smoke test of every code path")
    p.add_argument("--family", default=DEFAULT_FAMILY, help="the teacher family (model/families/): "
                   "qwen2_5_vl, qwen3_vl, qwen3_5")
    p.add_argument("--size", default=None, help="the teacher's published size in that family, e.g. 4B (default: "
                   f"{DEFAULT_SIZE} for {DEFAULT_FAMILY}; with --tiny the family's tiny teacher)")
    p.add_argument("--add", action="store_true", help="add this run's rows to the results file's rows of other "
                   "teachers instead of replacing the file")
    p.add_argument("--prefill", type=ints, default=None, help="prompt lengths, e.g. 8k,32k,128k,256k")
    p.add_argument("--contexts", type=ints, default=None, help="decode contexts, e.g. 8k,32k,128k,256k,512k")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--decode-steps", type=int, default=None, help="timed decode steps per point")
    p.add_argument("--single-max", type=_tokens, default=None,
                   help="longest student prompt tried in one pass (longer ones only in chunks)")
    p.add_argument("--prefill-chunk", type=int, default=None, help="student chunked-prefill chunk (tokens)")
    p.add_argument("--stream-frames", type=int, default=None, help="frames streamed with CUDA graphs")
    p.add_argument("--stream-eager-frames", type=int, default=None, help="frames streamed eagerly (comparison)")
    p.add_argument("--frame-size", type=int, default=None, help="frame side in pixels")
    p.add_argument("--breakdown-at", type=_tokens, default=None,
                   help="prompt length of one more prefill per model with each layer part timed (0: none)")
    p.add_argument("--skip-teacher", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="kernel profiles of the decode steps at the largest batch and context up to 128K, of the "
                        "one-pass prefill breakdown, and of a streamed frame (where the time goes: launches, idle "
                        "share, top kernels)")
    p.add_argument("--out", default=None, help="results folder (default bench/results; --tiny: a temp folder)")
    add_speculative_args(p)
    args = p.parse_args(argv)
    from model import FAMILIES

    if args.family not in FAMILIES:
        p.error(f"--family {args.family!r}: families are {', '.join(FAMILIES)}")
    sizes = FAMILIES[args.family].published
    if args.tiny:
        if args.size is not None:
            p.error("--tiny builds the family's tiny teacher: leave --size out")
    elif args.size is None and args.family == DEFAULT_FAMILY:
        args.size = DEFAULT_SIZE
    elif args.size not in sizes:
        p.error(f"--size {args.size!r}: {args.family} is published as {', '.join(sizes)}")
    defaults = TINY if args.tiny else FULL
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# -- models ----------------------------------------------------------------------------------------------------

def build_models_config(tiny: bool, processor, family: str = DEFAULT_FAMILY, size: str | None = DEFAULT_SIZE):
    """The teacher's config (the family's published shapes at `size`, or its tiny test shapes), with the
    special-token ids of our processor's tokenizer so streamed frames are laid out by the real M-RoPE code."""
    from model import FAMILIES
    from model.tiny import tiny_teacher_config

    if tiny:
        return tiny_teacher_config(processor.tokenizer, family)
    cfg = FAMILIES[family].published[size]()
    for name, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        setattr(cfg, name, processor.tokenizer.convert_tokens_to_ids(token))
    return cfg


def build_teacher(cfg, device, dtype):
    from model import family_of

    with torch.device(device):
        model = family_of(cfg).teacher_class._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def student_config(cfg, window: int):
    """The student's config: the family's default layout (1 sliding : 3 linear; Qwen3.5 its own), `window`."""
    from model import family_of

    return family_of(cfg).config_class.from_teacher(cfg, sliding_window=window)


def build_student(config, device, dtype):
    """The student as generation and streaming run it: input projections packed (model/packed.py)."""
    from model import family_of
    from model.packed import pack_projections

    with torch.device(device):
        model = family_of(config).model_class._from_config(config, dtype=dtype)
    pack_projections(model)
    return model.eval()


def layout(config) -> str:
    """"1 SWA : 3 gated_deltanet" style: the student's sliding and linear layers."""
    types = config.text_config.layer_types
    swa, linear = types.count("sliding_attention"), types.count("linear_attention")
    return f"{swa} SWA : {linear} {config.text_config.linear_mixer} layers"


def weights_gb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9


# -- measuring -------------------------------------------------------------------------------------------------

class Meter:
    """Wall time with the device synchronised, and the peak of allocated device memory since `start`."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def start(self):
        free_memory()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        return time.perf_counter()

    def seconds_since(self, t0) -> float:
        self.sync()
        return time.perf_counter() - t0

    def peak_gb(self):
        return round(torch.cuda.max_memory_allocated() / 1e9, 2) if self.cuda else None

    def allocated_mb(self):
        return torch.cuda.memory_allocated() / 1e6 if self.cuda else 0.0


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


BULKY = ("sequence", "samples", "profile")  # kept in the results file, left out of the log lines


def guarded(row: dict, fn) -> dict:
    """Runs one measurement; out-of-memory and other failures become the row's `error`, and the run goes on."""
    try:
        row.update(fn())
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as e:  # noqa: BLE001 - one failed point must not lose the others
        traceback.print_exc(file=sys.stderr)
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    free_memory()
    print(f"  { {k: v for k, v in row.items() if k not in BULKY} }", flush=True)
    return row


class Spans:
    """Where the time goes: total milliseconds per named part, from CUDA events around each call (host
    timers on CPU), read once at the end so that timing does not serialise the work."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.open: dict = {}
        self.closed: list = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin(self, key, name):
        self.open[key] = (name, self._mark())

    def end(self, key):
        name, start = self.open.pop(key)
        self.closed.append((name, start, self._mark()))

    def wrap(self, obj, attr: str, name: str) -> None:
        """Times every call of `obj.attr` (a bound method) under `name`."""
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            key = object()
            self.begin(key, name)
            out = fn(*args, **kwargs)
            self.end(key)
            return out

        setattr(obj, attr, timed)

    def hook_modules(self, modules: dict) -> list:
        """Times forward passes of modules, {name: [modules]}; returns the hook handles."""
        handles = []
        for name, mods in modules.items():
            for m in mods:
                handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: self.begin(mod, name)))
                handles.append(m.register_forward_hook(lambda mod, args, out: self.end(mod)))
        return handles

    def totals_ms(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        out: dict = {}
        for name, a, b in self.closed:
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            out[name] = out.get(name, 0.0) + ms
        return {k: round(v, 1) for k, v in out.items()}


def layer_parts(model) -> dict:
    """The decoder's token mixers by kind, and its MLPs (teacher or student, any family)."""
    from model import MIXERS, family_of

    names = {cls.__name__: name.replace("_", " ") for name, cls in MIXERS.items()}
    names["SlidingWindowAttention"] = "sliding attention"
    family = family_of(model.config)
    layers = model.model.language_model.layers
    parts: dict = {"mlp": [layer.mlp for layer in layers]}
    for layer in layers:
        mixer = family.teacher_mixer(layer)
        kind = type(mixer).__name__
        kind = names.get(kind) or ("gated deltanet" if kind.endswith("GatedDeltaNet") else "attention")
        parts.setdefault(kind, []).append(mixer)
    return parts


def prefill_breakdown(model, n, meter, device, chunk=None, profile: bool = False) -> dict:
    """One prefill of `n` tokens with every mixer and MLP timed: milliseconds per part, the rest as 'other'.
    `profile`: then a kernel profile of one more such prefill (its 25 costliest kernels)."""
    spans = Spans(device)
    handles = spans.hook_modules(layer_parts(model))
    try:
        run = teacher_prefill(model, n, meter, device) if chunk == "teacher" else \
            student_prefill(model, n, meter, device, chunk)
    finally:
        for h in handles:
            h.remove()
    parts = spans.totals_ms()
    parts["other"] = round(run["latency_ms"] - sum(parts.values()), 1)
    row = {"latency_ms": run["latency_ms"], **{f"{k}_ms": v for k, v in parts.items()}}
    if profile:
        once = (lambda: teacher_prefill(model, n, meter, device)) if chunk == "teacher" else \
            (lambda: student_prefill(model, n, meter, device, chunk))
        row["profile"] = kernel_profile(once, calls=1, cuda=meter.cuda, top=25)
    return row


def random_ids(vocab: int, batch: int, n: int, device) -> torch.Tensor:
    """Ordinary token ids, clear of the special ones (image/video placeholders), so the models see text."""
    low, high = (1000, vocab - 1000) if vocab > 4000 else (0, 200)
    return torch.randint(low, high, (batch, n), device=device)


def forward_kwargs(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# -- prefill ---------------------------------------------------------------------------------------------------

def teacher_prefill(teacher, n, meter, device):
    ids = random_ids(teacher.config.text_config.vocab_size, 1, n, device)
    t0 = meter.start()
    with torch.no_grad():
        teacher(input_ids=ids, use_cache=True, logits_to_keep=1)
    return {"latency_ms": round(meter.seconds_since(t0) * 1e3, 1), "peak_gb": meter.peak_gb()}


def student_prefill(student, n, meter, device, chunk: int | None):
    ids = random_ids(student.config.text_config.vocab_size, 1, n, device)
    step = n if chunk is None else chunk
    t0 = meter.start()
    with torch.no_grad():
        cache = student.new_cache()
        for i in range(0, n, step):
            student(input_ids=ids[:, i:i + step], cache=cache, use_cache=True, logits_to_keep=1)
    out = {"latency_ms": round(meter.seconds_since(t0) * 1e3, 1), "peak_gb": meter.peak_gb(),
           "state_mb": round(cache.nbytes() / 1e6, 1)}
    return out


# -- decode ----------------------------------------------------------------------------------------------------

def preallocated_kv_cache(teacher, batch: int, context: int, room: int, device, dtype):
    """A transformers DynamicCache holding `context` random keys/values per attention layer in storage allocated
    once for `context + room` tokens; new tokens are written in place. A teacher's own linear layers (Qwen3.5)
    keep transformers' state layer, which the first step fills: its cost does not depend on the context."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, LinearAttentionLayer

    from model import family_of

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, keys, values, length):
            super().__init__()
            self.device, self.is_initialized = keys.device, True
            self._k, self._v, self._n = keys, values, length
            self.keys, self.values = keys[:, :, :length], values[:, :, :length]

        def update(self, key_states, value_states, *args, **kwargs):
            n, T = self._n, key_states.shape[-2]
            self._k[:, :, n:n + T] = key_states
            self._v[:, :, n:n + T] = value_states
            self._n = n + T
            self.keys, self.values = self._k[:, :, :self._n], self._v[:, :, :self._n]
            return self.keys, self.values

    text = teacher.config.text_config
    family = family_of(teacher.config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    shape = (batch, text.num_key_value_heads, context + room, head_dim)
    cache = DynamicCache()
    cache.layers = [PreallocatedLayer(torch.empty(shape, device=device, dtype=dtype).normal_(),
                                      torch.empty(shape, device=device, dtype=dtype).normal_(), context)
                    if family.teacher_layer_kind(text, i) == "attention" else LinearAttentionLayer()
                    for i in range(text.num_hidden_layers)]
    return cache


def kv_layers(cache) -> list:
    """The preallocated key/value layers of a teacher cache (not the linear layers' states)."""
    return [layer for layer in cache.layers if hasattr(layer, "_k")]


def teacher_decode(teacher, batch, context, steps, warmup, meter, device, dtype, profile=False):
    meter.start()
    extra_steps = steps + 1 if profile else 0  # the profile's warm-up and calls write into the cache too
    cache = preallocated_kv_cache(teacher, batch, context, warmup + steps + extra_steps + 1, device, dtype)
    kv_gb = sum(t.numel() * t.element_size() for layer in kv_layers(cache) for t in (layer._k, layer._v)) / 1e9
    key = forward_kwargs(teacher)
    ids = random_ids(teacher.config.text_config.vocab_size, batch, warmup + steps, device)

    def step(i):
        teacher(input_ids=ids[:, i:i + 1], use_cache=True, logits_to_keep=1, **{key: cache})

    with torch.no_grad():
        for i in range(warmup):
            step(i)
        meter.sync()
        t0 = time.perf_counter()
        for i in range(warmup, warmup + steps):
            step(i)
        dt = meter.seconds_since(t0)
        extra = {"profile": kernel_profile(lambda: step(0), calls=steps, cuda=meter.cuda)} if profile else {}
    return {"ms_per_step": round(dt / steps * 1e3, 3), "tokens_per_s": round(batch * steps / dt, 1),
            "peak_gb": meter.peak_gb(), "state_gb": round(kv_gb, 2), **extra}


def teacher_decode_graphed(teacher, batch, context, steps, warmup, meter, device, dtype, profile=False):
    """The teacher's decode step captured in a CUDA graph, so both models are timed without launch overhead.
    Each replay appends the token at position `context` into the same slot of a preallocated KV cache and
    attends over all `context + 1` keys: the cost of any step at that context."""
    text = teacher.model.language_model
    meter.start()
    cache = preallocated_kv_cache(teacher, batch, context, 1, device, dtype)
    kv_gb = sum(t.numel() * t.element_size() for layer in kv_layers(cache) for t in (layer._k, layer._v)) / 1e9
    embeds = torch.randn(batch, 1, text.config.hidden_size, device=device, dtype=dtype)
    position_ids = torch.full((3, batch, 1), context, device=device, dtype=torch.long)

    def body():
        for layer in kv_layers(cache):  # back to `context` keys: the step rewrites slot `context`
            layer._n = context
        h = text(inputs_embeds=embeds, position_ids=position_ids, past_key_values=cache, use_cache=True).last_hidden_state
        return teacher.lm_head(h[:, -1:])

    from model.cuda_graphs import capture

    with torch.no_grad():
        graph, _ = capture(body)
        for _ in range(warmup):
            graph.replay()
        meter.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            graph.replay()
        dt = meter.seconds_since(t0)
        extra = {"profile": kernel_profile(graph.replay, calls=steps, cuda=meter.cuda)} if profile else {}
    return {"ms_per_step": round(dt / steps * 1e3, 3), "tokens_per_s": round(batch * steps / dt, 1),
            "peak_gb": meter.peak_gb(), "state_gb": round(kv_gb, 2), **extra}


def student_state_at(student, batch: int, context: int):
    """The student's cache as it is after `context` tokens: ring buffers full with the last W positions,
    recurrent and conv states set; values random (the cost of a step does not depend on them)."""
    from model.cache import SlidingWindowCache
    from model.cuda_graphs import allocate_cache

    cache = allocate_cache(student, batch)
    for state in cache.layers:
        if isinstance(state, SlidingWindowCache):
            state.keys.normal_()
            state.values.normal_()
            pos = torch.arange(max(context - state.size, 0), context, device=state.pos.device)
            state.pos[pos % state.size] = pos
            state.valid[:, pos % state.size] = True
        else:
            state.state.normal_(std=0.05)
            for t in state.conv.values():
                t.normal_()
    cache.seen = context
    return cache


def student_decode(student, batch, context, steps, warmup, meter, device, decoder=None, profile=False):
    """`decoder` None: the model's own forward step by step (eager); else a CUDAGraphDecoder's replays.
    `profile`: then a kernel profile of the step (bench/profiling.py)."""
    ids = random_ids(student.config.text_config.vocab_size, batch, warmup + steps, device)
    meter.start()
    cache = student_state_at(student, batch, context)
    with torch.no_grad():
        if decoder is not None:
            decoder.load(cache, context)
            step = lambda i: decoder.step(ids[:, i])  # noqa: E731
        else:
            pos = torch.full((3, batch, 1), context, device=device, dtype=torch.long)

            def step(i):
                student(input_ids=ids[:, i:i + 1], position_ids=pos + i, cache=cache, use_cache=True, logits_to_keep=1)
        for i in range(warmup):
            step(i)
        meter.sync()
        t0 = time.perf_counter()
        for i in range(warmup, warmup + steps):
            step(i)
        dt = meter.seconds_since(t0)
        row = {"ms_per_step": round(dt / steps * 1e3, 3), "tokens_per_s": round(batch * steps / dt, 1),
               "peak_gb": meter.peak_gb()}
        if profile:  # the state keeps its size, so more steps cost the same
            row["profile"] = kernel_profile(lambda: step(warmup), calls=steps, cuda=meter.cuda, top=25)
    state = decoder.cache if decoder is not None else cache
    return {**row, "state_gb": round(state.nbytes() / 1e9, 3)}


# -- streaming -------------------------------------------------------------------------------------------------

def streaming(student, processor, frames: int, size: int, graphs: bool, meter, sample_every: int,
              profile: bool = False):
    """Pushes `frames` frames (a pool of distinct random images, cycled) and times them end to end:
    preprocessing, vision tower, decoder. Memory is read after the first 10% of frames (graphs captured,
    allocator warm) and at the end."""
    from model.streaming import StreamingSession

    rs = np.random.RandomState(0)
    pool = [(rs.rand(size, size, 3) * 255).astype(np.uint8) for _ in range(16)]
    meter.start()
    session = StreamingSession(student, processor, frames_per_chunk=1, cuda_graphs=graphs)
    settle = max(2, frames // 10)
    for i in range(settle):
        session.push_frame(pool[i % len(pool)], i / 30)
    meter.sync()
    mem0, bytes0, seen0 = meter.allocated_mb(), session.state_bytes, session.cache.seen
    samples = []
    t0 = t_last = time.perf_counter()
    for i in range(settle, settle + frames):
        session.push_frame(pool[i % len(pool)], i / 30)
        if (i - settle + 1) % sample_every == 0:
            meter.sync()
            now = time.perf_counter()
            samples.append({"frames": i - settle + 1, "fps": round(sample_every / (now - t_last), 1),
                            "allocated_mb": round(meter.allocated_mb(), 1)})
            t_last = now
    dt = meter.seconds_since(t0)
    mem1 = meter.allocated_mb()
    tokens_per_frame = (session.cache.seen - seen0) / frames
    parts = stream_breakdown(session, pool, min(frames, 50), settle + frames, device=meter)
    if profile:
        at = iter(range(settle + frames + 50, 10 ** 9))
        def push():
            i = next(at)
            session.push_frame(pool[i % len(pool)], i / 30)

        parts["profile"] = kernel_profile(push, calls=10, cuda=meter.cuda)
    t_ask = time.perf_counter()
    answer = session.answer_ids("What happened in the video?", max_new_tokens=32)
    ask_s = meter.seconds_since(t_ask)
    return {"fps": round(frames / dt, 1), "frames": frames, "tokens_per_frame": tokens_per_frame,
            "memory_growth_mb": round(mem1 - mem0, 2), "state_bytes_same": session.state_bytes == bytes0,
            "state_mb": round(session.state_bytes / 1e6, 1), "peak_gb": meter.peak_gb(),
            "ask_ms": round(ask_s * 1e3, 1), "ask_tokens": len(answer), **parts, "samples": samples}


def stream_breakdown(session, pool, frames: int, start: int, device) -> dict:
    """Milliseconds per frame in each part of a push (host preprocessing and patchify, vision tower,
    decoder), over `frames` more frames. Each part is timed by events on the stream it runs on; with CUDA
    graphs the vision tower has its own stream beside the decoder's, so those two overlap and their sum
    exceeds the wall time per frame."""
    spans = Spans("cuda" if device.cuda else "cpu")
    spans.wrap(session, "_patchify", "patchify")
    spans.wrap(session, "_vision", "vision")
    spans.wrap(session, "_forward_chunk", "decoder")
    t0 = time.perf_counter()
    for i in range(start, start + frames):
        session.push_frame(pool[i % len(pool)], i / 30)
    wall = device.seconds_since(t0)
    for attr in ("_patchify", "_vision", "_forward_chunk"):
        del session.__dict__[attr]  # back to the class's methods
    per_frame = {f"{k}_ms_per_frame": round(v / frames, 2) for k, v in spans.totals_ms().items()}
    return {**per_frame, "wall_ms_per_frame": round(wall / frames * 1e3, 2)}


# -- the run ---------------------------------------------------------------------------------------------------

def run(args, save=lambda config, rows: None) -> tuple[dict, list[dict], dict]:
    """`save(config, rows)` is called after each part (a run cut short still leaves what it measured)."""
    from model.tiny import build_processor

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if args.tiny:
        torch.set_num_threads(1)  # tiny matrices: threads cost more than they give
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    processor = build_processor(min_pixels=args.frame_size ** 2, max_pixels=args.frame_size ** 2,
                                family=args.family)
    cfg = build_models_config(args.tiny, processor, args.family, args.size)
    window = 32 if args.tiny else 8192
    student_cfg = student_config(cfg, window)
    meter = Meter(device)
    teacher = f"{args.family} tiny" if args.tiny else f"{args.family} {args.size} shapes"
    config = {"device": device, "dtype": str(dtype).replace("torch.", ""),
              "teacher": f"{teacher}, random weights, transformers SDPA", "family": args.family, "size": args.size,
              "student": f"converted, {layout(student_cfg)}, window {window}", **{k: getattr(args, k) for k in FULL}}
    config["notes"] = [
        "decode contexts are not prefilled: the teacher's KV cache holds random keys/values of the right shape "
        "(allocated once at full length, written in place), the student's ring buffers and recurrent states "
        "likewise; a step costs the same as after a real prefill",
        "prefill and decode use text token ids; streaming frames go through the vision tower",
        "peak_gb is the peak of allocated GPU memory during that point, weights included (one model loaded)",
        "the student runs as generation and streaming run it: input projections packed into one GEMM per group "
        "and MLP widths padded to a multiple of 8 (model/packed.py)"]
    rows: list[dict] = []
    warmup = 2
    profile_ctx = max((c for c in args.contexts if c <= 128 * K), default=max(args.contexts))
    profiled = lambda b, ctx: args.profile and b == max(args.batches) and ctx == profile_ctx  # noqa: E731

    if not args.skip_teacher:
        print("teacher: building", flush=True)
        teacher = build_teacher(cfg, device, dtype)
        config["teacher_weights_gb"] = round(weights_gb(teacher), 2)
        guarded({}, lambda: teacher_prefill(teacher, min(args.prefill), meter, device))  # warm-up
        for n in args.prefill:
            rows.append(guarded({"bench": "prefill", "model": "teacher", "mode": "one pass", "batch": 1,
                                 "context": n}, lambda: teacher_prefill(teacher, n, meter, device)))
        at = args.breakdown_at
        if at:
            rows.append(guarded({"bench": "breakdown", "model": "teacher", "mode": "one pass", "batch": 1, "context": at},
                                lambda: prefill_breakdown(teacher, at, meter, device, "teacher", args.profile)))
        from model.cuda_graphs import graphs_available

        modes = [("eager", teacher_decode)] + ([("cuda graphs", teacher_decode_graphed)] if graphs_available(device)
                                               else [])
        for b in args.batches:
            for ctx in args.contexts:
                for mode, fn in modes:
                    row = guarded({"bench": "decode", "model": "teacher", "mode": mode, "batch": b, "context": ctx},
                                  lambda: fn(teacher, b, ctx, args.decode_steps, warmup, meter, device, dtype,
                                             profile=profiled(b, ctx)))
                    rows.append(row)
                if row.get("error") == "out of memory":
                    break  # longer contexts need more
        del teacher
        free_memory()
        save(config, rows)

    print("student: building", flush=True)
    student = build_student(student_cfg, device, dtype)
    config["student_weights_gb"] = round(weights_gb(student), 2)
    guarded({}, lambda: student_prefill(student, min(args.prefill), meter, device, None))  # warm-up / compile
    # chunks after the first start from a state: other kernel variants, autotuned on first use (56 s at 32K on
    # the H200 when this warm-up was missing)
    guarded({}, lambda: student_prefill(student, 2 * args.prefill_chunk, meter, device, args.prefill_chunk))
    for n in args.prefill:
        if n <= args.single_max:
            # flex attention is compiled for each new length: the first pass at a length is not timed
            guarded({}, lambda: student_prefill(student, n, meter, device, None))
            rows.append(guarded({"bench": "prefill", "model": "student", "mode": "one pass", "batch": 1, "context": n},
                                lambda: student_prefill(student, n, meter, device, None)))
        rows.append(guarded({"bench": "prefill", "model": "student", "mode": f"chunks of {args.prefill_chunk}",
                             "batch": 1, "context": n},
                            lambda: student_prefill(student, n, meter, device, args.prefill_chunk)))

    save(config, rows)
    if args.breakdown_at:
        at = args.breakdown_at
        for mode, chunk in (("one pass", None), (f"chunks of {args.prefill_chunk}", args.prefill_chunk)):
            rows.append(guarded({"bench": "breakdown", "model": "student", "mode": mode, "batch": 1, "context": at},
                                lambda: prefill_breakdown(student, at, meter, device, chunk,
                                                          args.profile and chunk is None)))

    from model.cuda_graphs import CUDAGraphDecoder, graphs_available

    graphs = graphs_available(device)
    for b in args.batches:
        decoder = None
        if graphs:
            try:
                decoder = CUDAGraphDecoder(student, b, use_graph=True)
            except Exception:  # noqa: BLE001 - the eager rows still come
                traceback.print_exc(file=sys.stderr)
                rows.append({"bench": "decode", "model": "student", "mode": "cuda graphs", "batch": b,
                             "error": "capture failed (traceback on stderr)"})
        for ctx in args.contexts:
            rows.append(guarded({"bench": "decode", "model": "student", "mode": "eager", "batch": b, "context": ctx},
                                lambda: student_decode(student, b, ctx, args.decode_steps, warmup, meter, device,
                                                       profile=profiled(b, ctx))))
            if decoder is not None:
                rows.append(guarded({"bench": "decode", "model": "student", "mode": "cuda graphs", "batch": b,
                                     "context": ctx},
                                    lambda: student_decode(student, b, ctx, args.decode_steps, warmup, meter, device,
                                                           decoder, profile=profiled(b, ctx))))
        decoder = None
        free_memory()
        save(config, rows)

    streams = (("eager", args.stream_eager_frames, False), ("cuda graphs", args.stream_frames, graphs))
    for mode, n, use_graphs in streams:
        if n and (use_graphs or mode == "eager"):
            rows.append(guarded({"bench": "streaming", "model": "student", "mode": mode, "batch": 1,
                                 "frame": f"{args.frame_size}x{args.frame_size}"},
                                lambda: streaming(student, processor, n, args.frame_size, use_graphs, meter,
                                                  sample_every=max(n // 20, 1), profile=args.profile)))
    if not graphs:  # CPU: the eager stream is the stream
        for r in rows:
            if r["bench"] == "streaming":
                r["mode"] = "eager (no CUDA)"
    return config, rows, summarize(rows)


def _find(rows, **match):
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()) and "error" not in r:
            return r
    return None


def summarize(rows) -> dict:
    """The issue's headline figures (None where a point failed)."""
    def ratio(a, b, key):
        return round(a[key] / b[key], 2) if a and b and b.get(key) else None

    ok = [r for r in rows if "error" not in r]
    big = max((r["context"] for r in ok if r["bench"] == "prefill"), default=None)
    c128 = 128 * K if any(r.get("context") == 128 * K for r in ok) else None
    ctxs = sorted({r["context"] for r in ok if r["bench"] == "decode"})
    long_ctx, short_ctx = (c128 or (ctxs[-1] if ctxs else None)), (ctxs[0] if ctxs else None)
    prefill_ctx = c128 or big
    def fastest_student(ctx):  # one pass or in chunks, whichever is faster
        return min((r for r in ok if r["bench"] == "prefill" and r["model"] == "student" and r["context"] == ctx),
                   key=lambda r: r["latency_ms"], default=None)

    teacher_prefill = _find(rows, bench="prefill", model="teacher", context=prefill_ctx)
    student_prefill = fastest_student(prefill_ctx)
    b_max = max((r["batch"] for r in ok if r["bench"] == "decode"), default=None)
    # decode ratios compare like with like: both models graphed where both graphed, else both eager
    graphed = all(_find(rows, bench="decode", model=m, mode="cuda graphs", batch=b_max, context=long_ctx)
                  for m in ("student", "teacher"))
    best = "cuda graphs" if graphed else "eager"
    s_long = _find(rows, bench="decode", model="student", mode=best, batch=b_max, context=long_ctx)
    t_long = _find(rows, bench="decode", model="teacher", mode=best, batch=b_max, context=long_ctx)
    s_long_eager = _find(rows, bench="decode", model="student", mode="eager", batch=b_max, context=long_ctx)
    t_long_eager = _find(rows, bench="decode", model="teacher", mode="eager", batch=b_max, context=long_ctx)
    s1_long = _find(rows, bench="decode", model="student", mode=best, batch=1, context=long_ctx)
    s1_short = _find(rows, bench="decode", model="student", mode=best, batch=1, context=short_ctx)
    t1_long = _find(rows, bench="decode", model="teacher", mode=best, batch=1, context=long_ctx)
    t1_short = _find(rows, bench="decode", model="teacher", mode=best, batch=1, context=short_ctx)
    stream = _find(rows, bench="streaming", mode="cuda graphs") or _find(rows, bench="streaming")
    return {
        "prefill_speedup_128k": ratio(teacher_prefill, student_prefill, "latency_ms"),
        "prefill_speedup_256k": ratio(_find(rows, bench="prefill", model="teacher", context=256 * K),
                                      fastest_student(256 * K), "latency_ms"),
        # named by the batch they were measured at: a run without batch 8 has no batch-8 figure
        "decode_speedup_b8_128k": ratio(s_long, t_long, "tokens_per_s") if b_max == 8 else None,
        "decode_speedup_b8_128k_eager": ratio(s_long_eager, t_long_eager, "tokens_per_s") if b_max == 8 else None,
        "decode_speedup_b1_128k": ratio(s1_long, t1_long, "tokens_per_s"),
        "decode_latency_ratio_128k_vs_8k": ratio(s1_long, s1_short, "ms_per_step"),
        "teacher_decode_latency_ratio_128k_vs_8k": ratio(t1_long, t1_short, "ms_per_step"),
        "streaming_fps": stream["fps"] if stream else None,
        "streaming_memory_growth_mb": stream["memory_growth_mb"] if stream else None,
        "prefill_context": prefill_ctx, "decode_context_long": long_ctx, "decode_context_short": short_ctx,
        "decode_batch": b_max, "student_prefill_mode": student_prefill["mode"] if student_prefill else None,
        "decode_mode": best,
    }


def plot(rows, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (the JSON has every number)", flush=True)
        return None
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    series = {}
    for r in rows:
        if "error" in r or r["bench"] not in ("prefill", "decode"):
            continue
        key = (r["bench"], f"{r['model']} {r['mode']}" + (f" b{r['batch']}" if r["bench"] == "decode" else ""))
        series.setdefault(key, []).append(r)
    for (bench, label), pts in sorted(series.items()):
        pts.sort(key=lambda r: r["context"])
        x = [r["context"] for r in pts]
        style = "--" if label.startswith("teacher") else "-"
        if bench == "prefill":
            axes[0].plot(x, [r["latency_ms"] / 1e3 for r in pts], style, marker="o", label=label)
        else:
            axes[1].plot(x, [r["ms_per_step"] for r in pts], style, marker="o", label=label)
        axes[2].plot(x, [r["peak_gb"] for r in pts], style, marker="o", label=f"{bench}: {label}")
    titles = ("prefill latency (s)", "decode latency (ms / step)", "peak GPU memory (GB)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")  # eager steps are host-bound and ~10x the graphed ones: both must stay readable
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.speculative:
        return speculative_main(args)
    out = args.out or (tempfile.mkdtemp(prefix="bench-inference-") if args.tiny else None)
    t0 = time.perf_counter()
    where = {"out_dir": out} if out else {}
    write = functools.partial(add_result, f"{args.family} {args.size or 'tiny'}") if args.add else write_result

    def save(config, rows):
        write("inference", {**config, "partial": True, "wall_s": round(time.perf_counter() - t0, 1)}, rows,
              summarize(rows), **where)

    config, rows, summary = run(args, save)
    config["wall_s"] = round(time.perf_counter() - t0, 1)
    path = write("inference", config, rows, summary, **where)
    name = f"inference_{args.family}_{args.size or 'tiny'}.png" if args.add else "inference.png"
    plot(rows, os.path.join(os.path.dirname(path), name))
    show(rows, summary)
    print(f"wrote {path} in {config['wall_s']} s")
    return {"path": path, "summary": summary, "rows": rows}


# -- speculative decoding ----------------------------------------------------------------------------------------

def add_speculative_args(p) -> None:
    p.add_argument("--speculative", action="store_true",
                   help="only speculative decoding (transformers' generate, batch 1): plain greedy against a draft of "
                        "the model's own first layers and against prompt lookup; writes inference_speculative.json")
    p.add_argument("--spec-context", type=_tokens, default=None, help="prompt length (default 128k; --tiny 256)")
    p.add_argument("--spec-new-tokens", type=int, default=None, help="tokens generated (default 256; --tiny 12)")
    p.add_argument("--spec-draft-layers", type=int, default=4, help="decoder layers of the layer-skip draft")
    p.add_argument("--spec-draft-tokens", type=int, default=5, help="tokens the draft proposes per round")
    p.add_argument("--spec-lookup-tokens", type=int, default=10, help="prompt lookup: tokens proposed per match")
    p.add_argument("--checkpoint", default=None,
                   help="a student checkpoint directory to measure (default: random weights, whose drafts and "
                        "lookups are accepted at rates no trained model would show)")


def speculative_main(args) -> dict:
    """Speculative decoding against plain greedy decoding, both through transformers' generate() at batch 1 after a
    prompt of --spec-context tokens. A draft proposes tokens, the model checks them in one forward and keeps the
    longest agreeing prefix plus its own next token, so the output is the model's greedy output (checked: matches_greedy)
    and only its speed changes. Per mode: the decode time (the generate() time less a 1-token generate(), i.e. less
    the prefill), tokens/s, the share of proposed tokens accepted, tokens per verifying forward, peak memory."""
    from model.draft import layer_skip_draft
    from model.tiny import build_processor

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    context = args.spec_context or (256 if args.tiny else 128 * K)
    new_tokens = args.spec_new_tokens or (12 if args.tiny else 256)
    torch.manual_seed(0)
    if args.checkpoint:
        from model.checkpoint import load_pretrained
        from model.packed import pack_projections

        student, _ = load_pretrained(args.checkpoint, dtype=dtype)
        student = student.to(device)
        pack_projections(student)
    else:
        student = build_student(student_config(build_models_config(args.tiny, build_processor()),
                                               32 if args.tiny else 8192), device, dtype)
    draft = layer_skip_draft(student, args.spec_draft_layers, num_assistant_tokens=args.spec_draft_tokens)
    draft.generation_config.assistant_confidence_threshold = 0.0  # always propose --spec-draft-tokens
    modes = {"greedy": {}, f"layer-skip draft ({args.spec_draft_layers} layers)": {"assistant_model": draft},
             "prompt lookup": {"prompt_lookup_num_tokens": args.spec_lookup_tokens}}
    meter = Meter(device)
    ids = random_ids(student.config.text_config.vocab_size, 1, context, device)
    config = {"device": device, "dtype": str(dtype).replace("torch.", ""), "context": context,
              "new_tokens": new_tokens, "draft_layers": args.spec_draft_layers, "draft_tokens": args.spec_draft_tokens,
              "lookup_tokens": args.spec_lookup_tokens, "weights": args.checkpoint or "random",
              "window": student.config.text_config.sliding_window,
              "notes": ["batch 1, transformers generate() with do_sample=False in every mode",
                        "decode_s excludes the model's prefill: a 1-token generate() of the same prompt is subtracted; "
                        "with the draft it includes the draft's own prefill of the prompt (its first layers)",
                        "acceptance = accepted proposals / proposed tokens; tokens_per_forward = new tokens / "
                        "forwards of the model after the prefill's"]}
    rows: list[dict] = []
    out = args.out or (tempfile.mkdtemp(prefix="bench-inference-") if args.tiny else None)

    def publish() -> tuple[str, dict]:
        """The results so far, written after every mode: a run cut short (a device call's limit) keeps them."""
        base = _find(rows, mode="greedy")
        summary = {"speculative_context": context}
        for r in rows:
            if r["mode"] not in ("greedy", "prefill only") and "error" not in r and base and "decode_s" in base:
                key = "lookup" if r["mode"] == "prompt lookup" else "draft"
                summary[f"{key}_speedup_vs_greedy"] = round(base["decode_s"] / max(r["decode_s"], 1e-9), 2)
                summary[f"{key}_acceptance"] = r["acceptance"]
                summary[f"{key}_matches_greedy"] = r["matches_greedy"]
        return write_result("inference_speculative", config, rows, summary, **({"out_dir": out} if out else {})), summary

    # warm-up at the timed prompt length: kernels compiled and autotuned at its shapes and at the verifying forwards'
    # lengths before timing (warmed on a 256-token prompt, a trained student's first 128K run timed the prefill at
    # 35 s, 0.08 s warm, and its draft at 68 s, 7.7 s warm, on an H100)
    for kwargs in modes.values():
        guarded({}, lambda: speculative_run(student, ids, min(new_tokens, 16), kwargs, meter))
    prefill = guarded({"bench": "speculative", "mode": "prefill only"},
                      lambda: speculative_run(student, ids, 1, {}, meter))
    prefill.pop("sequence", None)
    rows.append(prefill)
    greedy = None
    for mode, kwargs in modes.items():
        row = guarded({"bench": "speculative", "mode": mode, "batch": 1, "context": context},
                      lambda: speculative_run(student, ids, new_tokens, kwargs, meter))
        if "error" not in row and "error" not in prefill:
            row["decode_s"] = round(row["seconds"] - prefill["seconds"], 3)
            row["tokens_per_s"] = round((row["new_tokens"] - 1) / max(row["decode_s"], 1e-9), 2)
            sequence = row.pop("sequence")
            greedy = sequence if greedy is None else greedy
            row["matches_greedy"] = sequence == greedy
        row.pop("sequence", None)
        rows.append(row)
        print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        path, summary = publish()
    print("\nsummary:", summary, f"\nwrote {path}")
    return {"path": path, "summary": summary, "rows": rows}


def speculative_run(student, ids, new_tokens: int, kwargs: dict, meter) -> dict:
    """One generate() of `new_tokens` after `ids`, timed, with the model's forwards counted: (tokens fed, per
    forward) tells how many proposals each verifying forward checked."""
    fed = []
    hook = student.register_forward_pre_hook(
        lambda module, args, kw: fed.append(kw["input_ids"].shape[1]), with_kwargs=True)
    t0 = meter.start()
    try:
        with torch.no_grad():
            out = student.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, **kwargs)
        seconds = meter.seconds_since(t0)
    finally:
        hook.remove()
    made = out.shape[1] - ids.shape[1]
    # the first forward holds the prompt (and, speculating, the first proposals); each later one holds the last
    # accepted token and the proposals; every forward yields one token of the model's own past the accepted ones
    proposed = fed[0] - ids.shape[1] + sum(n - 1 for n in fed[1:])
    accepted = made - len(fed)
    row = {"seconds": round(seconds, 3), "new_tokens": made, "forwards": len(fed), "peak_gb": meter.peak_gb(),
           "tokens_per_forward": round(made / len(fed), 2), "proposed": proposed,
           "acceptance": round(accepted / proposed, 3) if proposed else None, "sequence": out[0, ids.shape[1]:].tolist()}
    return row


def show(rows, summary) -> None:
    for bench in ("prefill", "breakdown", "decode", "streaming"):
        part = [{k: v for k, v in r.items() if k not in ("bench", "samples", "profile")} for r in rows
                if r["bench"] == bench]
        if not part:
            continue
        keys = list(dict.fromkeys(k for r in part for k in r))
        print(f"\n{bench}")
        table = [{k: r.get(k, "") for k in keys} for r in part]
        try:
            print_table(table)
        except ImportError:  # rich is missing on some GPU images
            for r in table:
                print("  " + "  ".join(f"{k}={v}" for k, v in r.items()))
    for r in rows:
        if "profile" in r:
            show_profile(f"profile: {r['model']} {r['bench']} {r['mode']} batch {r['batch']}"
                         + (f" context {r['context']}" if "context" in r else ""), r["profile"])
    print("\nsummary:", summary)


if __name__ == "__main__":
    main()
