"""Generation and chat: every generated token is what one full forward over the prompt and the tokens
before it picks (the cache, positions, padding and image/video paths agree with the model's own
forward); chat from frames or a video file; the `infinitevl generate` command on a saved checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import save_pretrained
from model.generation import generate, sample
from pipeline.data.media import decode_video
from pipeline.serve.chat import chat, user_turn
from tests.helpers import random_image
from pipeline.data.synthetic import write_video

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def student(tiny_student):
    return tiny_student


_image = random_image


def _frames(n, seed=0, size=56):
    rs = np.random.RandomState(seed)
    return [Image.fromarray((rs.rand(size, size, 3) * 255).astype("uint8")) for _ in range(n)]


def _greedy_by_full_forwards(model, inputs, n):
    """The reference: n tokens, each the argmax of a fresh forward (no cache, positions computed by the
    model from the whole sequence) over the prompt plus the tokens chosen so far."""
    ids = inputs["input_ids"]
    vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out = []
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([ids, torch.tensor([out], dtype=torch.long).view(1, -1)], 1)
            out.append(int(model(input_ids=seq, **vision).logits[0, -1].argmax()))
    return out


def test_generated_tokens_equal_full_forwards_with_images_and_padding(student, processor):
    questions = ["how many?", "what is the color of the biggest shape in the picture on the left?"]
    texts = [processor.apply_chat_template([user_turn(q, 1)], add_generation_prompt=True) for q in questions]
    images = [_image(1), _image(2, 120, 90)]
    batch = processor(texts, images=images)
    assert (batch["attention_mask"][0] == 0).any()  # row 0 is left-padded
    got = generate(student, batch, max_new_tokens=10, eos_token_id=[])  # past the window of 8
    assert got.shape == (2, 10)
    for i in range(2):
        alone = processor(texts[i:i + 1], images=images[i:i + 1])
        assert got[i].tolist() == _greedy_by_full_forwards(student, alone, 10)


def test_generation_stops_at_end_of_turn_and_pads_finished_rows(student, processor):
    batch = processor([processor.apply_chat_template([user_turn("count")], True)])
    free = generate(student, batch, max_new_tokens=6, eos_token_id=[])[0].tolist()
    stop = free[2]  # pretend the third token ends the turn
    got = generate(student, batch, max_new_tokens=6, eos_token_id=stop)[0].tolist()
    assert got == free[:free.index(stop) + 1]


def test_sampling_is_seeded_and_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]]).repeat(64, 1)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a, b = sample(logits, 1.0, 1.0, g(1)), sample(logits, 1.0, 1.0, g(1))
    assert torch.equal(a, b) and set(a.tolist()) >= {1, 2}
    # p(1) ≈ 0.52, p(2) ≈ 0.47: top_p 0.5 keeps token 1 alone, 0.9 keeps both, never 0 or 3
    assert set(sample(logits, 1.0, 0.5, g(2)).tolist()) == {1}
    assert set(sample(logits, 1.0, 0.9, g(3)).tolist()) == {1, 2}
    assert torch.equal(sample(logits, 0.0), torch.ones(64, dtype=torch.long))


def _write_video(path, n_frames=12, fps=6, size=56):
    frames = []
    for i in range(n_frames):
        frame = np.full((size, size, 3), 20 * i, np.uint8)
        frame[: size // 2, : size // 2] = 255 - 20 * i
        frames.append(Image.fromarray(frame))
    write_video(path, frames, fps=fps)


def test_chat_with_video_frames_and_image_equals_full_forwards(student, processor):
    frames, image = _frames(4, seed=3), _image(4)
    messages = [user_turn("which object appeared first?", 1, True)]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text, images=[image], videos=[frames], video_fps=2.0)
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 4]]  # 4 frames → 2 temporal patches of 4×4 patches
    expected = _greedy_by_full_forwards(student, inputs, 5)
    # no end-of-turn stops generate here: all 5 tokens are compared, whatever the random student picks
    assert generate(student, inputs, max_new_tokens=5, eos_token_id=[])[0].tolist() == expected
    # chat stops at the end of turn: its answer is the reference's tokens up to there, and this setup (the
    # session's tiny student, these frames and image) answers with text before any end of turn
    eos = student.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    said = expected[:next((i for i, t in enumerate(expected) if t in eos), len(expected))]
    reference = processor.decode(said, skip_special_tokens=True).strip()
    assert reference, (expected, "the student ends its turn at once: pick inputs it answers")
    answer = chat(student, processor, messages, images=[image], video=frames, video_fps=2.0, max_new_tokens=5)
    assert answer == reference


def test_chat_reads_a_video_file_at_the_asked_rate_and_frame_cap(student, processor, tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    _write_video(path)  # 2 s at 6 fps
    clip = decode_video(str(path), 1.5, 2)  # 1.5 fps would give 3 frames: capped at 2, spread over 2 s
    assert len(clip.frames) == 2 and clip.fps == pytest.approx(1.0)
    from_path = chat(student, processor, "what happens?", video=path, video_fps=1.5, max_frames=2, max_new_tokens=6)
    from_frames = chat(student, processor, "what happens?", video=clip.frames, video_fps=clip.fps, max_new_tokens=6)
    assert from_path == from_frames
    seen = []
    preprocess = processor.preprocess_video
    monkeypatch.setattr(processor, "preprocess_video", lambda frames, fps, *a: seen.append((len(frames), fps))
                        or preprocess(frames, fps, *a))
    chat(student, processor, "what happens?", video=path, video_fps=3.0, max_frames=12, max_new_tokens=1)
    assert seen == [(6, 3.0)]
    frames = _frames(10, seed=7)
    chat(student, processor, "what happens?", video=frames, video_fps=5.0, max_frames=4, max_new_tokens=1)
    assert seen[-1] == (4, 2.0)  # 10 frames at 5 fps thinned to 4 spread over the same 2 s


class EndsTurnAt:
    """The student, except that its `n`-th forward picks the end-of-turn token (a large logit added there): an
    answer that ends its turn after n - 1 tokens, as a trained model's does."""

    def __init__(self, model, n: int, token: int):
        self.model, self.n, self.token, self.calls = model, n, token, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        out = self.model(*args, **kwargs)
        if self.calls == self.n:
            out.logits[..., self.token] += 1e4
        return out


def test_chat_stops_at_the_end_of_turn_and_streams_what_it_says(student, processor, monkeypatch):
    from transformers import TextStreamer

    from pipeline.serve.chat import stop_ids

    end_of_turn = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # a checkpoint whose generation config names only <|endoftext|> still stops where its turn ends
    monkeypatch.setattr(student.generation_config, "eos_token_id",
                        processor.tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    assert end_of_turn in stop_ids(student, processor)
    text = processor.apply_chat_template([user_turn("what color is it?", 1)], add_generation_prompt=True)
    inputs = processor(text, images=[_image(0)])
    free = generate(student, inputs, max_new_tokens=6, eos_token_id=[])[0].tolist()
    wrapped = EndsTurnAt(student, 3, end_of_turn)
    printed = []
    streamer = TextStreamer(processor.tokenizer, skip_prompt=False, skip_special_tokens=True)
    monkeypatch.setattr(streamer, "on_finalized_text", lambda t, stream_end=False: printed.append(t))
    answer = chat(wrapped, processor, "what color is it?", images=[_image(0)], max_new_tokens=50, streamer=streamer)
    assert wrapped.calls == 3, "generation ended with the end-of-turn token, not at max_new_tokens"
    said = processor.decode(free[:2], skip_special_tokens=True).strip()
    assert said, (free, "the random student starts with blank text here: pick inputs it answers")
    assert answer == said
    assert "".join(printed).strip() == answer


def test_generate_command_answers_with_a_student_and_a_teacher_with_a_system_prompt(student, processor,
                                                                                   tiny_teacher, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from pipeline.serve.chat import stop_ids

    teacher, _ = tiny_teacher
    save_pretrained(student, processor, tmp_path / "student")
    teacher.save_pretrained(tmp_path / "teacher")
    processor.save_pretrained(tmp_path / "teacher")
    image = tmp_path / "shapes.png"
    _image(5).save(image)
    args = ["--image", str(image), "--prompt", "how many circles?", "--system", "Answer in one word.",
            "--max-new-tokens", "8"]
    expected = chat(student, processor, "how many circles?", images=[_image(5)], max_new_tokens=8,
                    system="Answer in one word.")
    streamed = CliRunner().invoke(app, ["generate", str(tmp_path / "student"), *args])
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout.strip() == expected  # stderr carries the loading progress

    # the teacher answers through transformers' own generate, in the same template, with the same stop
    messages = [{"role": "system", "content": "Answer in one word."}, user_turn("how many circles?", 1)]
    inputs = processor(processor.apply_chat_template(messages, add_generation_prompt=True), images=[_image(5)])
    stop = stop_ids(teacher, processor)
    with torch.no_grad():
        out = teacher.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
    reference = processor.decode(out[0, inputs["input_ids"].shape[1]:].tolist(), skip_special_tokens=True).strip()
    both = CliRunner().invoke(app, ["generate", str(tmp_path / "teacher"), str(tmp_path / "student"), "--no-stream",
                                    *args])
    assert both.exit_code == 0, both.output
    assert both.stdout.splitlines() == [f"== {tmp_path / 'teacher'}", reference,
                                        f"== {tmp_path / 'student'}", expected]

    missing = CliRunner().invoke(app, ["generate", str(tmp_path / "nope"), "--prompt", "hi"])
    assert missing.exit_code == 2 and "no checkpoint directory" in missing.output


def test_transformers_generate_sees_the_image_like_our_generation(student, processor):
    batch = processor([processor.apply_chat_template([user_turn("how many?", 1)], True)], images=[_image(0)])
    theirs = student.generate(**batch, max_new_tokens=8, do_sample=False)[:, batch["input_ids"].shape[1]:]
    assert theirs[0].tolist() == generate(student, batch, max_new_tokens=8)[0].tolist()
