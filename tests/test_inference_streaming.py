"""Streaming: the state stays the same size however many frames come in, questions leave the stream as
it was, and a stream (frames, text pushed mid-stream, a question) answers exactly what one forward over
the same tokens answers, with the positions the model's own M-RoPE layout gives them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.processing import VIDEO_TOKEN, VISION_END, VISION_START
from model.streaming import StreamingSession

CHUNK = VISION_START + VIDEO_TOKEN + VISION_END


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def student(tiny_student):
    return tiny_student


def _frames(n, seed=0, size=56):
    rs = np.random.RandomState(seed)
    return [Image.fromarray((rs.rand(size, size, 3) * 255).astype("uint8")) for _ in range(n)]


def _state(session):
    return [t.clone() for layer in session.cache.layers for t in layer.tensors()], session.cache.seen, \
        session.position


def test_state_size_is_constant_in_the_number_of_frames(student, processor):
    session = StreamingSession(student, processor)
    sizes = {}
    for i, frame in enumerate(_frames(50), 1):
        session.push_frame(frame, timestamp=i / 2)
        if i in (10, 50):
            sizes[i] = session.state_bytes
    # 50 frames × 6 tokens is far past the window of 8: the ring buffers wrapped many times
    assert session.cache.seen > 300 and sizes[10] == sizes[50] > 0


def test_asking_leaves_the_stream_as_it_was(student, processor):
    session = StreamingSession(student, processor, system_prompt="You watch a camera.")
    for frame in _frames(6, seed=1):
        session.push_frame(frame)
    before = _state(session)
    first = session.answer_ids("what is in the picture?", 6)
    after = _state(session)
    assert after[1:] == before[1:]
    assert all(torch.equal(a, b) for a, b in zip(after[0], before[0]))
    assert session.answer_ids("what is in the picture?", 6) == first
    session.push_frame(_frames(1, seed=2)[0])  # the stream goes on from where it was
    assert session.cache.seen == before[1] + 6


@pytest.mark.parametrize("frames_per_chunk", [1, 2])
def test_stream_answers_what_one_forward_over_the_same_tokens_answers(student, processor, frames_per_chunk):
    frames = _frames(6, seed=3)
    session = StreamingSession(student, processor, frames_per_chunk=frames_per_chunk)
    session.push_frame(frames[0], 0.0)
    session.push_frame(frames[1], 0.5)
    session.push_text("the camera turns left.")
    for t, frame in enumerate(frames[2:], 2):
        session.push_frame(frame, t / 2)
    question = "which color is at the top left?"
    got = session.answer_ids(question, 5)

    # the same conversation as one prompt: each chunk its own video of one temporal patch
    chunks = [frames[i:i + frames_per_chunk] for i in range(0, 6, frames_per_chunk)]
    before_text = 2 // frames_per_chunk
    content = CHUNK * before_text + "the camera turns left." + CHUNK * (len(chunks) - before_text) + question
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text, videos=chunks, video_fps=2.0)
    ids = inputs["input_ids"]
    vision = {k: inputs[k] for k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")}
    expected = []
    with torch.no_grad():
        reference_logits = student(input_ids=ids, **vision).logits[0, -1]
        torch.testing.assert_close(session.answer_logits(question), reference_logits, atol=2e-5, rtol=1e-4)
        for _ in range(5):
            seq = torch.cat([ids, torch.tensor([expected], dtype=torch.long).view(1, -1)], 1)
            expected.append(int(student(input_ids=seq, **vision).logits[0, -1].argmax()))
            if expected[-1] == student.generation_config.eos_token_id:
                break
    assert got == expected

    # positions: the stream's counter is where the model's own layout puts the question
    n_question = len(processor.tokenizer(question + "<|im_end|>\n<|im_start|>assistant\n",
                                         add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        full_positions = student.model.get_rope_index(
            ids, mm_token_type_ids=inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
            second_per_grid_ts=inputs["second_per_grid_ts"])[0]
    assert session.position == int(full_positions[0, 0, -n_question])
    assert session.cache.seen == ids.shape[1] - n_question


def test_a_frame_before_its_pair_is_not_seen_and_time_does_not_go_back(student, processor):
    session = StreamingSession(student, processor, frames_per_chunk=2)
    seen = session.cache.seen
    a, b = _frames(2, seed=4)
    session.push_frame(a, 1.0)
    assert session.cache.seen == seen
    session.push_frame(b, 1.5)
    assert session.cache.seen == seen + 4 + 2  # one chunk: 2×2 merged patches + start/end tags
    with pytest.raises(ValueError, match="go back"):
        session.push_frame(a, 1.2)
    with pytest.raises(ValueError, match="frames_per_chunk"):
        StreamingSession(student, processor, frames_per_chunk=3)


def test_frames_at_their_processed_size_are_patchified_like_the_processor(student, processor, monkeypatch):
    session = StreamingSession(student, processor)
    preprocess, calls = processor.preprocess_video, []
    monkeypatch.setattr(processor, "preprocess_video", lambda *a, **k: calls.append(a) or preprocess(*a, **k))
    for n, size in ((1, 56), (2, 56), (1, 84)):
        frames = _frames(n, seed=5, size=size)
        ours = session._patchify(frames)
        theirs = preprocess(frames, fps=1.0)
        assert ours["video_grid_thw"].tolist() == theirs["video_grid_thw"].tolist()
        torch.testing.assert_close(ours["pixel_values_videos"], theirs["pixel_values_videos"], atol=1e-5, rtol=1e-5)
    assert not calls  # all three took the on-device path
    big = _frames(1, seed=6, size=300)  # the processor's max_pixels shrink it: its own path
    assert session._patchify(big)["video_grid_thw"].tolist() == preprocess(big, 1.0)["video_grid_thw"].tolist()
    assert len(calls) == 1


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
@pytest.mark.parametrize("frames_per_chunk", [1, 2])
def test_qwen3_layout_stream_answers_what_one_forward_answers(family, frames_per_chunk):
    """Frames as timed chunks (`<t seconds>` + the chunk's tokens), DeepStack features added where the family has
    them (Qwen3-VL), the hybrid student's state carried chunk to chunk: the answer's logits equal one forward over
    the same tokens with the family's own M-RoPE layout."""
    from model import convert_teacher
    from model.tiny import build_tiny_teacher

    teacher, processor = build_tiny_teacher(family=family)
    torch.manual_seed(0)
    student = convert_teacher(teacher, sliding_window=8).eval()
    frames, times = _frames(4, seed=7), [0.0, 0.5, 1.0, 1.5]
    session = StreamingSession(student, processor, frames_per_chunk=frames_per_chunk)
    for i, (frame, t) in enumerate(zip(frames, times)):
        session.push_frame(frame, t)
        if i == 1:
            session.push_text("the camera turns left.")
    question = "which color is at the top left?"
    got = session.answer_logits(question)

    tok = lambda s: processor.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    opening, header = processor.apply_chat_template([{"role": "user", "content": "\0"}], True).split("\0")
    ids, pixels, grids = tok(opening), [], []
    for c in range(0, 4, frames_per_chunk):
        video = processor.preprocess_video(frames[c:c + frames_per_chunk], fps=1.0)
        pixels.append(video["pixel_values_videos"])
        grids.append(video["video_grid_thw"])
        n = int(video["video_grid_thw"].prod()) // processor.merge_size ** 2
        seconds = (times[c] + times[c + frames_per_chunk - 1]) / 2
        ids += tok(processor.frame_placeholder(seconds, n))
        if c + frames_per_chunk == 2:
            ids += tok("the camera turns left.")
    ids += tok(question + header)
    with torch.no_grad():
        expected = student(input_ids=torch.tensor([ids]), pixel_values_videos=torch.cat(pixels),
                           video_grid_thw=torch.cat(grids)).logits[0, -1]
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
