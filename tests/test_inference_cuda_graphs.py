"""The CUDA-graph decoder: its step (the capturable in-place forward) equals the model's forward step by
step, batched and left-padded, and leaves the cache it started from alone; on the GPU, replayed graphs
give the logits of eager steps over 20 tokens, for decoding and for streamed frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model import convert_from_qwen2_5_vl
from model.cuda_graphs import CUDAGraphDecoder
from model.generation import prefill
from pipeline.serve.chat import user_turn
from tests.helpers import random_image


pytestmark = pytest.mark.usefixtures("one_thread")


_image = random_image


def _padded_batch(processor):
    questions = ["how many?", "what is the color of the biggest shape in the picture?"]
    texts = [processor.apply_chat_template([user_turn(q, 1)], add_generation_prompt=True) for q in questions]
    batch = processor(texts, images=[_image(1), _image(2)])
    assert (batch["attention_mask"][0] == 0).any()
    return batch


def _reference_steps(model, cache, next_pos, tokens):
    out = []
    with torch.no_grad():
        for i, token in enumerate(tokens):
            out.append(model(input_ids=token[:, None], position_ids=(next_pos + i)[:, :, None], cache=cache,
                             use_cache=True).logits[:, -1])
    return out


def test_decoder_steps_equal_model_forward_and_leave_the_source_cache(tiny_teacher, processor):
    torch.manual_seed(0)
    model = convert_from_qwen2_5_vl(tiny_teacher[0], sliding_window=8, init="random").eval()
    batch = _padded_batch(processor)
    cache = model.new_cache()
    _, next_pos = prefill(model, batch, cache)
    source = [t.clone() for layer in cache.layers for t in layer.tensors()]
    tokens = torch.randint(0, model.config.text_config.vocab_size, (20, 2), generator=torch.Generator().manual_seed(0))

    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device"):
        decoder = CUDAGraphDecoder(model, batch_size=2, use_graph=True)
    decoder.load(cache, next_pos)
    got = [decoder.step(t).clone() for t in tokens]
    assert all(torch.equal(a, b) for a, b in zip(source, (t for layer in cache.layers for t in layer.tensors())))
    expected = _reference_steps(model, cache.copy(), next_pos, tokens)  # 20 steps: the window of 8 wraps
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)
    assert decoder.cache.seen == cache.seen + 20


def _gpu_student():
    from model.tiny import build_tiny_teacher

    # head_dim 64 so that the Gated DeltaNet layers take fla's kernels, as the full-size model does
    teacher, processor = build_tiny_teacher(seed=0, hidden=256, heads=4, kv_heads=2, intermediate=512,
                                            num_layers=4, vision_hidden=64)
    torch.manual_seed(0)
    model = convert_from_qwen2_5_vl(teacher, sliding_window=16, init="random").eval()
    return model.cuda().to(torch.bfloat16), processor


def test_vision_tower_without_host_syncs_equals_transformers_window_attention(tiny_teacher, processor, monkeypatch):
    from transformers import AttentionInterface

    from model import cuda_graphs

    torch.manual_seed(0)
    model = convert_from_qwen2_5_vl(tiny_teacher[0], sliding_window=8, init="random").eval()
    segments, masked = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        segments.append(kwargs["cu_seq_lens_q"].tolist())
        return cuda_graphs.varlen_sdpa(*args, **kwargs)

    def spy_sdpa(*args, **kwargs):
        masked.append(kwargs.get("attn_mask") is not None)
        return sdpa(*args, **kwargs)

    AttentionInterface.register(cuda_graphs.VISION_ATTENTION, spy)
    monkeypatch.setattr(cuda_graphs.F, "scaled_dot_product_attention", spy_sdpa)
    try:
        # 112 and 168: 4 and 9 windows of 2×2 merged patches (16 patches each), then one full-attention block,
        # all run as unmasked batches; 140: 3×3 windows of unequal sizes, run with a block-diagonal mask
        for size in (112, 140, 168):
            video = processor.preprocess_video([_image(size, size, size)], fps=1.0)
            with torch.no_grad():
                expected = model.model.get_video_features(video["pixel_values_videos"], video["video_grid_thw"],
                                                          return_dict=True).pooler_output[0]
            vision = cuda_graphs.GraphedVision(model.model.visual, video["video_grid_thw"], use_graph=False)
            segments.clear()
            masked.clear()
            torch.testing.assert_close(vision(video["pixel_values_videos"]), expected, atol=1e-5, rtol=1e-5)
            n = int(video["video_grid_thw"].prod())
            if size == 140:
                assert len(segments[0]) == 10 and segments[1] == [0, n] and masked == [True, False]
            else:
                assert segments == [list(range(0, n + 1, 16)), [0, n]] and masked == [False, False]
    finally:
        AttentionInterface.register(cuda_graphs.VISION_ATTENTION, cuda_graphs.varlen_sdpa)
    assert model.config.vision_config._attn_implementation != cuda_graphs.VISION_ATTENTION


def test_vision_attention_over_a_training_sized_batch_equals_transformers_with_gradients(tiny_teacher, processor,
                                                                                        monkeypatch):
    """A training batch holds thousands of windows of a few sizes (the mechanisms teacher's 64 recall streams:
    ~250K patches), far past where a block-diagonal mask fits: the segments are grouped by length, one SDPA a
    length. Forward and gradients (pixels, a vision weight) equal transformers' own per-window attention."""
    from model import cuda_graphs
    from model.cuda_graphs import vision_attention

    teacher = tiny_teacher[0]
    # a 40-frame 112² video (4 windows of 16 patches a frame pair), a 140² picture (windows of 3 sizes) and a 224²
    # one; the mask's limit lowered so that this CPU-sized batch takes the grouped path as a training batch does
    monkeypatch.setattr(cuda_graphs, "MASKED_MAX_TOKENS", 1024)
    video = processor.preprocess_video([_image(s, 112, 112) for s in range(40)], fps=2.0)
    images = processor.image_processor([_image(7, 140, 140), _image(8, 224, 224)], return_tensors="pt")
    visual = teacher.model.visual
    grids = torch.cat([video["video_grid_thw"], images["image_grid_thw"]])
    pixels = torch.cat([video["pixel_values_videos"], images["pixel_values"]]).requires_grad_()
    assert int(grids.prod(-1).sum()) > cuda_graphs.MASKED_MAX_TOKENS
    grouped = []
    by_length = cuda_graphs._by_segment_length
    monkeypatch.setattr(cuda_graphs, "_by_segment_length", lambda *a: grouped.append(1) or by_length(*a))
    weight = visual.blocks[0].attn.qkv.weight
    results = []
    for ours in (False, True):
        visual.zero_grad()
        pixels.grad = None
        with vision_attention(visual) if ours else torch.enable_grad():
            out = visual(pixels, grid_thw=grids).pooler_output
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), pixels.grad.clone(), weight.grad.clone()))
    assert grouped, "the grouped path did not run"
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_stream_through_static_buffers_equals_the_plain_stream(tiny_teacher, processor):
    from model.streaming import StreamingSession

    torch.manual_seed(0)
    model = convert_from_qwen2_5_vl(tiny_teacher[0], sliding_window=8, init="random").eval()
    plain = StreamingSession(model, processor, cuda_graphs=False)
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device"):
        static = StreamingSession(model, processor, cuda_graphs=True)
    for session in (plain, static):
        for i in range(8):
            session.push_frame(_image(10 + i, 56 if i != 4 else 84, 56 if i != 4 else 84), i / 2)
            if i == 3:
                session.push_text("a red square enters.")
    assert set(static._chunk_graphs) == {6, 11} and len(static._vision_graphs) == 2  # two frame shapes
    assert static.cache.seen == plain.cache.seen and static.position == plain.position
    for a, b in zip(*[[t for layer in s.cache.layers for t in layer.tensors()] for s in (plain, static)]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(static.answer_logits("what entered?"), plain.answer_logits("what entered?"),
                               atol=1e-5, rtol=1e-4)
    assert static.answer_ids("what entered?", 6) == plain.answer_ids("what entered?", 6)


def test_graph_bodies_read_no_tensor_values_on_the_host(tiny_teacher):
    """A CUDA graph replays device work only: a body that reads a value on the host (`.item()`,
    `bool(t)`, `.tolist()`) cannot be captured. On the meta device every such read raises, so a body that
    runs there has none. (The vision tower's index tensors are computed from the grid once, outside.)"""
    from model.cuda_graphs import GraphedForward, GraphedVision, allocate_cache

    torch.manual_seed(0)
    model = convert_from_qwen2_5_vl(tiny_teacher[0], sliding_window=8, init="random").eval()
    with pytest.raises(RuntimeError):
        bool(torch.ones(2, device="meta").all())
    grid = torch.tensor([[1, 8, 8]])
    vision = GraphedVision(model.model.visual, grid, use_graph=False)
    model.to("meta")
    cache = allocate_cache(model, 2)
    decode = GraphedForward(model, cache, 2, 1, from_ids=True, logits=True, advance_positions=True, use_graph=False)
    chunk = GraphedForward(model, cache, 2, 6, from_ids=False, logits=False, advance_positions=False, use_graph=False)
    vision.index = {k: t.to("meta") if torch.is_tensor(t) else t for k, t in vision.index.items()}
    vision.grid, vision.pixels = grid.to("meta"), torch.zeros(64, 1176, device="meta")
    with torch.no_grad():
        assert decode._body().shape == (2, model.config.text_config.vocab_size)
        assert chunk._body().shape == (2, model.config.text_config.hidden_size)
        assert vision._body().shape == (16, model.config.text_config.hidden_size)
        with pytest.raises((RuntimeError, NotImplementedError)):  # transformers' own path reads the grid
            model.model.visual(vision.pixels, grid_thw=vision.grid)


@pytest.mark.gpu
def test_replayed_decode_graph_gives_the_eager_logits_over_20_steps():
    model, processor = _gpu_student()
    batch = _padded_batch(processor)
    cache = model.new_cache()
    _, next_pos = prefill(model, batch, cache)
    tokens = torch.randint(0, model.config.text_config.vocab_size, (20, 2), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(0))
    eager, graphed = CUDAGraphDecoder(model, 2, use_graph=False), CUDAGraphDecoder(model, 2, use_graph=True)
    assert graphed.step_graph.graph is not None
    eager.load(cache, next_pos)
    graphed.load(cache, next_pos)
    reference = _reference_steps(model, cache.copy(), next_pos, tokens)
    for i, token in enumerate(tokens):
        e, g = eager.step(token).float(), graphed.step(token).float()
        torch.testing.assert_close(g, e, atol=1e-3, rtol=1e-3)  # the same kernels, replayed
        err = (g - reference[i].float()).abs().max() / reference[i].float().abs().max()
        assert err < 3e-2, (i, err)  # the model's own forward: other kernels in bf16


@pytest.mark.gpu
def test_streamed_frames_through_graphs_match_eager_frames():
    from model.streaming import StreamingSession

    model, processor = _gpu_student()
    rs = np.random.RandomState(0)
    frames = [Image.fromarray((rs.rand(56, 56, 3) * 255).astype("uint8")) for _ in range(12)]
    sessions = [StreamingSession(model, processor, cuda_graphs=g) for g in (False, True)]
    for s in sessions:
        for i, f in enumerate(frames):
            s.push_frame(f, i / 4)
            if i == 5:
                s.push_text("a car passes.")
    assert sessions[1]._chunk_graphs and all(g.graph is not None for g in sessions[1]._chunk_graphs.values())
    assert sessions[0].state_bytes == sessions[1].state_bytes
    eager, graphed = (s.answer_logits("what passed?").float() for s in sessions)
    err = (graphed - eager).abs().max() / eager.abs().max()
    assert err < 5e-2, err  # bf16; the eager stream's vision tower splits its windows, ours masks them
