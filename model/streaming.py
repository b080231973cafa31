"""Streaming video: frames pushed one at a time, text at any moment, into a state of constant size;
questions answered on a copy of that state, so the stream goes on undisturbed.

Each frame (or each `frames_per_chunk` consecutive frames: a temporal patch is 2 frames) enters as a video of
one temporal patch, wrapped in <|vision_start|> … <|vision_end|>; in the Qwen3-VL / Qwen3.5 layout (the
processor's `video_layout`) preceded by its time as text, `<t seconds>` (the mean of its frames' timestamps;
frames pushed without one count one per second), and with DeepStack features where the family has them.
Positions follow
a running counter exactly as `rope_index` lays out a prompt holding those chunks in that order: a chunk's
visual tokens take (counter, counter + row, counter + column) and the counter then moves past the
chunk's longer side, so the temporal position keeps increasing from frame to frame, and a stream sees the
same token sequence, at the same positions, as one forward over all of it would (tested).

The whole stream is one user turn of the chat template: the session opens it, `push_text` adds to it,
and `ask` closes it on the copy (question, end of turn, assistant header) and generates the answer.

With CUDA graphs the vision tower runs on a stream of its own: a push only enqueues work (the frame goes up
from pinned memory, nothing waits on the host), so frame t+1's vision tower runs beside frame t's decoder
chunk. Each is a few hundred small kernels that leave most of the GPU idle; side by side they fill it. Events
order what must be ordered: the decoder waits for its frame's visual tokens, and the vision tower does not
overwrite its output before the decoder has taken it.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from .cuda_graphs import (
    CUDAGraphDecoder,
    GraphedForward,
    GraphedVision,
    allocate_cache,
    forward_in_place,
    graphs_available,
)
from .generation import sample
from .packed import pack_projections
from .positions import rope_index
from .processing import VIDEO_TOKEN, VISION_END, VISION_START, _to_rgb

_SLOT = "\x00question\x00"


class StreamingSession:
    """One stream on one model. Not thread-safe; one session per stream.

    `cuda_graphs` (default: when the model is on a CUDA device) replays captured graphs: the vision tower
    and the decoder for each frame-chunk shape, and one decode step for answers. Asked for without a CUDA
    device, the same static-buffer steps run eagerly (with a warning)."""

    def __init__(self, model, processor, system_prompt: str | None = None, frames_per_chunk: int = 1,
                 min_pixels: int | None = None, max_pixels: int | None = None, cuda_graphs: bool | None = None):
        tp = processor.temporal_patch_size
        if frames_per_chunk not in (1, tp):
            raise ValueError(f"frames_per_chunk must be 1 (each frame its own temporal patch) or {tp} "
                             f"(consecutive frames share one), got {frames_per_chunk}")
        self.model, self.processor = model, processor
        pack_projections(model)
        self.frames_per_chunk = frames_per_chunk
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.device = next(model.parameters()).device
        self.cuda_graphs = graphs_available(self.device) if cuda_graphs is None else cuda_graphs
        self._capture = self.cuda_graphs and graphs_available(self.device)
        if self.cuda_graphs and not self._capture:
            warnings.warn(f"CUDA graphs need a CUDA device; the model is on {self.device}, running the graphs' steps "
                          "eagerly", stacklevel=2)
        self.cache = allocate_cache(model, 1)
        self.position = 0  # M-RoPE position of the next token
        self.frames_seen = 0
        self.last_timestamp: float | None = None
        self._pending: list = []
        self._chunk_graphs: dict[int, GraphedForward] = {}
        self._vision_graphs: dict[tuple, GraphedVision] = {}
        self._decoder: CUDAGraphDecoder | None = None
        self._vision_stream = torch.cuda.Stream(self.device) if self._capture else None
        self._visual_taken: torch.cuda.Event | None = None  # the decoder's copy of the last visual tokens
        ip = processor.image_processor
        self._mean = torch.tensor(ip.image_mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(ip.image_std, dtype=torch.float32, device=self.device)
        self._ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in (VISION_START, VIDEO_TOKEN, VISION_END)}
        eos = model.generation_config.eos_token_id
        self._eos = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}

        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
            [{"role": "user", "content": _SLOT}]
        opening, self._answer_header = processor.apply_chat_template(messages, add_generation_prompt=True).split(_SLOT)
        self.push_text(opening)

    # -- the stream ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def push_text(self, text: str) -> None:
        ids = self._tokenize(text)
        if ids.shape[1] == 0:
            return
        positions = self.position + torch.arange(ids.shape[1], device=self.device).expand(3, 1, -1)
        embeds = self.model.model.language_model.embed_tokens(ids)
        forward_in_place(self.model, self.cache, embeds, positions, self.cache.seen)
        self.cache.seen += ids.shape[1]
        self.position += ids.shape[1]

    @torch.no_grad()
    def push_frame(self, image, timestamp: float | None = None) -> None:
        """A frame (PIL image or H×W×3 uint8 array) at `timestamp` seconds; with `frames_per_chunk=2` it
        waits for the next one, and the pair enters together."""
        if timestamp is not None:
            if self.last_timestamp is not None and timestamp < self.last_timestamp:
                raise ValueError(f"frame timestamps go back: {timestamp} after {self.last_timestamp}")
            self.last_timestamp = timestamp
        self._pending.append((image, float(self.frames_seen) if timestamp is None else float(timestamp)))
        self.frames_seen += 1
        if len(self._pending) == self.frames_per_chunk:
            pending, self._pending = self._pending, []
            self._push_chunk([f for f, _ in pending], (pending[0][1] + pending[-1][1]) / 2)

    def _push_chunk(self, frames, seconds: float) -> None:
        with self._on_vision_stream() as visual_ready:
            video = self._patchify(frames)
            grid = video["video_grid_thw"]
            visual, levels = self._vision(video["pixel_values_videos"], grid)
        n = int(grid.prod()) // self.processor.merge_size ** 2
        prefix = self.processor.tokenizer(f"<{seconds:.1f} seconds>", add_special_tokens=False)["input_ids"] \
            if self.processor.video_layout == "qwen3_vl" else []
        ids = torch.tensor([prefix + [self._ids[VISION_START]] + [self._ids[VIDEO_TOKEN]] * n
                            + [self._ids[VISION_END]]])
        positions, _ = rope_index(self.model.config, ids, video_grid_thw=grid,
                                  second_per_grid_ts=video["second_per_grid_ts"])
        next_position = self.position + int(positions[0, 0, -1]) + 1  # the end tag is text: all rows equal
        positions = self._upload(positions + self.position)

        embeds = self.model.model.language_model.embed_tokens(self._upload(ids))
        if visual_ready is not None:
            torch.cuda.current_stream(self.device).wait_event(visual_ready)
        visual_at = slice(len(prefix) + 1, len(prefix) + 1 + n)
        embeds[0, visual_at] = visual.to(embeds.dtype)
        dense = []
        for level in levels:  # DeepStack, dense over the chunk: zeros off the visual tokens
            d = torch.zeros_like(embeds)
            d[0, visual_at] = level.to(embeds.dtype)
            dense.append(d)
        if visual_ready is not None:
            self._visual_taken = torch.cuda.current_stream(self.device).record_event()
        self._forward_chunk(embeds, positions, dense)
        self.position = next_position

    @contextlib.contextmanager
    def _on_vision_stream(self):
        """Runs the block on the vision stream (where there is one), after the decoder has taken the last
        visual tokens; yields the event the decoder waits for (recorded when the block ends), else None."""
        if self._vision_stream is None:
            yield None
            return
        ready = torch.cuda.Event()
        if self._visual_taken is not None:
            self._vision_stream.wait_event(self._visual_taken)
        with torch.cuda.stream(self._vision_stream):
            yield ready
            ready.record(self._vision_stream)

    def _upload(self, t: torch.Tensor) -> torch.Tensor:
        """Host → device without the host waiting for the GPU's queue (a copy from pageable memory would)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _patchify(self, frames) -> dict:
        """The processor's video patches for one chunk. Frames already at the size the processor would
        resize them to are normalised and patchified on the model's device: on the CPU that work would cost
        a streaming GPU more time per frame than the vision tower does."""
        # one temporal patch: its time step does not enter the positions (temporal index 0 × interval)
        arrays = [np.asarray(_to_rgb(f)) for f in frames]
        h, w = arrays[0].shape[:2]
        ip = self.processor.image_processor
        target = smart_resize(h, w, factor=self.processor.patch_size * self.processor.merge_size,
                              min_pixels=self.min_pixels or ip.size["shortest_edge"],
                              max_pixels=self.max_pixels or ip.size["longest_edge"])
        if target != (h, w) or any(a.shape != arrays[0].shape for a in arrays):
            return self.processor.preprocess_video(frames, fps=1.0, min_pixels=self.min_pixels,
                                                   max_pixels=self.max_pixels)
        tp, p, m = self.processor.temporal_patch_size, self.processor.patch_size, self.processor.merge_size
        x = self._upload(torch.from_numpy(np.stack(arrays))).float() / 255.0
        x = (x - self._mean) / self._std  # [n, H, W, C]
        x = x.permute(0, 3, 1, 2)
        x = torch.cat([x, x[-1:].expand(tp - len(arrays) % tp, -1, -1, -1)]) if len(arrays) % tp else x
        t, c, gh, gw = x.shape[0] // tp, x.shape[1], h // p, w // p
        x = x.reshape(t, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return {"pixel_values_videos": x.reshape(t * gh * gw, c * tp * p * p),
                "video_grid_thw": torch.tensor([[t, gh, gw]]), "second_per_grid_ts": torch.tensor([float(tp)])}

    def _vision(self, pixels, grid) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The chunk's merged visual tokens and its DeepStack levels (none for towers without DeepStack). Only
        Qwen2.5-VL's windowed tower is captured as a graph; the others run eagerly."""
        visual = self.model.model.visual
        if self.cuda_graphs and isinstance(visual, Qwen2_5_VisionTransformerPretrainedModel):
            key = tuple(grid.flatten().tolist())
            if key not in self._vision_graphs:
                self._vision_graphs[key] = GraphedVision(visual, grid, use_graph=self._capture)
            return self._vision_graphs[key](pixels), []
        out = self.model.model.get_video_features(pixels.to(self.device), grid.to(self.device), return_dict=True)
        levels = getattr(out, "deepstack_features", None) or []
        return out.pooler_output[0], [level[0] for level in levels]

    def _forward_chunk(self, embeds, positions, deepstack: list[torch.Tensor]) -> None:
        T = embeds.shape[1]
        if not self.cuda_graphs:
            forward_in_place(self.model, self.cache, embeds, positions, self.cache.seen,
                             (None, deepstack) if deepstack else None)
            self.cache.seen += T
            return
        graph = self._chunk_graphs.get(T)
        if graph is None:
            graph = self._chunk_graphs[T] = GraphedForward(self.model, self.cache, 1, T, from_ids=False, logits=False,
                                                           advance_positions=False, use_graph=self._capture,
                                                           deepstack_levels=len(deepstack))
        graph.embeds.copy_(embeds)
        for buffer, level in zip(graph.deepstack, deepstack):
            buffer.copy_(level)
        graph.positions.copy_(positions)
        graph.offset.fill_(self.cache.seen)
        graph.run()

    # -- questions -------------------------------------------------------------------------------------------
    def ask(self, question: str, max_new_tokens: int = 64, temperature: float = 0.0) -> str:
        """The answer to `question` about everything pushed so far (frames still waiting for their pair are
        not seen yet). Runs on a copy of the state: the stream is left as it was."""
        ids = self.answer_ids(question, max_new_tokens, temperature)
        return self.processor.decode(ids, skip_special_tokens=True).strip()

    @torch.no_grad()
    def answer_logits(self, question: str) -> torch.Tensor:
        """Logits [vocab] of the answer's first token (e.g. to score choices), on a copy of the state."""
        return self._start_answer(question)[0].clone()

    @torch.no_grad()
    def answer_ids(self, question: str, max_new_tokens: int = 64, temperature: float = 0.0) -> list[int]:
        logits = self._start_answer(question)
        decoder = self._decoder
        out: list[int] = []
        for i in range(max_new_tokens):
            token = sample(logits, temperature)
            out.append(int(token))
            if out[-1] in self._eos or i + 1 == max_new_tokens:
                break
            logits = decoder.step(token)
        return out

    def _start_answer(self, question: str) -> torch.Tensor:
        """Copies the state into the decoder's own cache and runs the question and the assistant header."""
        if self._decoder is None:
            self._decoder = CUDAGraphDecoder(self.model, 1, use_graph=self._capture)
        self._decoder.load(self.cache, self.position)
        return self._decoder.prefill(self._tokenize(question + self._answer_header))

    # -- what the state holds --------------------------------------------------------------------------------
    @property
    def state_bytes(self) -> int:
        return self.cache.nbytes()

    def _tokenize(self, text: str) -> torch.Tensor:
        ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor([ids], dtype=torch.long, device=self.device)
