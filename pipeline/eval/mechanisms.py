"""The mechanisms suite: two tasks that tell a sliding window, a linear mixer and their hybrid apart.

  recall      a frame stream: grey distractor frames, and one temporal patch (two frames) that shows the key,
              a coloured shape ("red circle") or a short word ("lamp"); the question comes after the last
              frame. A window that does not reach back to the key cannot answer; a linear state can, if it
              kept the key. Frames are 56x56, the processor's smallest, so a frame costs 2 tokens
              (TOKENS_PER_FRAME): a 64-token window covers 32 frames and 16x past it is 512 frames.
  dense_text  one to three strings of 6-12 random characters (lowercase letters and digits) on a 336x84
              picture, a character to each 28-pixel cell, the processor's merged token (22-pixel type; a line
              starts at a drawn cell); the question names a line and the answer is its string, scored by
              exact match and by character accuracy. Information dense: up to 36 unrelated characters in 36
              tokens, what a fixed-size linear state is said to blur.
              Why a character a cell: the from-scratch teacher never read strings in 10-pixel proportional
              type, three characters a token (its loss stayed at the characters' prior, ln 36); it reads these
              (docs/benchmarks.md "The mechanisms suite's teacher", where the change is measured).

Both are picture kinds (pipeline/eval/synthetic.py PICTURE_KINDS), so the teacher stage trains on them, the
data stage's `sample-pictures` corpora hold them and the held-out `pictures` suite scores them; the sweeps
below (recall against distance, recall against frame count, text reading) are what bench/mechanisms.py scores.
Every answer is determined by the picture or the frames: the generators draw it first, then draw it in.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from .dataset import make_sample
from .metrics import levenshtein, normalize_vqa_answer
from .synthetic import COLORS, HELD_OUT_SEED, SHAPES, WORDS, draw_shape

FRAME = 56             # pixels a side: the processor's minimum, 2x2 merged tokens a temporal patch
TOKENS_PER_FRAME = 2   # 4 merged tokens per temporal patch of 2 frames (checked against the processor in tests)
TEMPORAL_PATCH = 2
FPS = 2.0
MIN_FRAMES = 4
# tokens a recall sample spends outside its frames (template, question, instruction, assistant header), rounded
# up: a corpus of seq_len tokens holds streams of at most (seq_len - PROMPT_TOKENS) / TOKENS_PER_FRAME frames
PROMPT_TOKENS = 96

RECALL_QUESTION = "what was shown in the video?"
RECALL_DETAIL = {"shape": "what color was the shape in the video?", "word": "which word was written in the video?"}
TEXT_ALPHABET = string.ascii_lowercase + string.digits
TEXT_LENGTHS = (6, 12)
TEXT_CELL = 28                   # a character a merged token: the processor's 28-pixel cells
TEXT_COLUMNS = TEXT_LENGTHS[1]
TEXT_SIZE = (TEXT_COLUMNS * TEXT_CELL, 3 * TEXT_CELL)  # 336x84: three lines, 36 image tokens
TEXT_TYPE = 22                   # pixels: the glyphs fill most of their cell
TEXT_PIXELS = TEXT_SIZE[0] * TEXT_SIZE[1]  # the processor's max_pixels must reach it (no downscaling)
LINE_NAMES = ("first", "second", "third")


# -- recall over distance ---------------------------------------------------------------------------------------
def frames_that_fit(seq_len: int) -> int:
    """The longest recall stream a sample of at most `seq_len` tokens holds (an even number of frames)."""
    return max(0, (seq_len - PROMPT_TOKENS) // TOKENS_PER_FRAME) // TEMPORAL_PATCH * TEMPORAL_PATCH


def recall_stream(rng: random.Random, n_frames: int, key_at: int) -> tuple[list[Image.Image], list[tuple[str, str]]]:
    """`n_frames` frames; frames key_at and key_at + 1 (one temporal patch) show the key, the others grey shapes
    on grey. Returns the frames and two (question, answer) pairs: what was shown, and its colour or word."""
    if n_frames < MIN_FRAMES or n_frames % TEMPORAL_PATCH:
        raise ValueError(f"a recall stream has an even number of frames, at least {MIN_FRAMES}: got {n_frames}")
    if key_at % TEMPORAL_PATCH or not 0 <= key_at <= n_frames - TEMPORAL_PATCH:
        raise ValueError(f"key_at {key_at} must start a temporal patch inside {n_frames} frames")
    kind = rng.choice(("shape", "word"))
    if kind == "shape":
        colour, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        answer, detail = f"{colour} {shape}", colour
        key = Image.new("RGB", (FRAME, FRAME), "white")
        draw_shape(ImageDraw.Draw(key), shape, (10, 10, FRAME - 10, FRAME - 10), COLORS[colour])
    else:
        answer = detail = rng.choice(WORDS)
        key = Image.new("RGB", (FRAME, FRAME), "white")
        ImageDraw.Draw(key).text((6, 20), answer, fill="black", font=_font())
    greys = [(rng.choice(SHAPES), rng.choice((70, 100, 160, 190)), rng.randrange(0, FRAME - 20),
              rng.randrange(0, FRAME - 20)) for _ in range(n_frames)]
    frames = []
    for t in range(n_frames):
        if key_at <= t < key_at + TEMPORAL_PATCH:
            frames.append(key.copy())
            continue
        frame = Image.new("RGB", (FRAME, FRAME), (128, 128, 128))
        shape, grey, x, y = greys[t]
        draw_shape(ImageDraw.Draw(frame), shape, (x, y, x + 20, y + 20), (grey,) * 3)
        frames.append(frame)
    return frames, [(RECALL_QUESTION, answer), (RECALL_DETAIL[kind], detail)]


def recall(rng: random.Random, max_frames: int = 64,
           min_frames: int = MIN_FRAMES) -> tuple[list[Image.Image], list[tuple[str, str]]]:
    """A training or held-out recall stream: its length log-uniform from `min_frames` to `max_frames` (so every
    distance scale is as common as every other), the key at any temporal patch."""
    top = max(MIN_FRAMES, max_frames // TEMPORAL_PATCH * TEMPORAL_PATCH)
    low = min(top, max(MIN_FRAMES, min_frames))
    n = int(round(math.exp(rng.uniform(math.log(low), math.log(top))) / TEMPORAL_PATCH)) * TEMPORAL_PATCH
    n = min(top, max(low, n))
    return recall_stream(rng, n, TEMPORAL_PATCH * rng.randrange(n // TEMPORAL_PATCH))


def length_octave(index: int, seed: int, max_frames: int) -> tuple[int, int]:
    """The frame range of training batch `index`'s recall streams: one octave [MIN_FRAMES·2^k, 2·MIN_FRAMES·2^k]
    (capped at `max_frames`), k drawn uniformly, so the streams of one batch have about one length (the batch
    pads to its longest) while over the batches the lengths stay log-uniform from MIN_FRAMES to `max_frames`."""
    octaves = max(1, math.ceil(math.log2(max(MIN_FRAMES, max_frames) / MIN_FRAMES)))
    low = MIN_FRAMES * 2 ** random.Random(f"octave/{seed}/{index}").randrange(octaves)
    return low, min(max_frames, 2 * low)


def recall_sample(distractors: int, index: int, seed: int = HELD_OUT_SEED, lead: int = 0,
                  n_frames: int | None = None) -> dict:
    """A held-out recall question, as an eval sample with in-memory frames. With `n_frames` the key sits at a
    drawn temporal patch of a stream that long (the frames sweep); else it comes after `lead` frames and is
    followed by `distractors` frames (the distance sweep)."""
    rng = random.Random(f"recall/{seed}/{distractors}/{lead}/{n_frames}/{index}")
    if n_frames is None:
        frames, qa = recall_stream(rng, lead + TEMPORAL_PATCH + distractors, lead)
    else:
        frames, qa = recall_stream(rng, n_frames, TEMPORAL_PATCH * rng.randrange(n_frames // TEMPORAL_PATCH))
    question, answer = qa[0]
    return frame_sample(f"recall/{n_frames or distractors}/{index}", "recall", frames, question, answer)


def frame_sample(sample_id: str, category: str, frames: list[Image.Image], question: str, answer: str) -> dict:
    """An eval sample of in-memory frames (the runner's `frames` + `video_fps`), scored by exact match after the
    VQA normalisation (the answer given ten times)."""
    return {**make_sample(id=sample_id, suite="mechanisms", image=None, question=question, answers=[answer] * 10,
                          metric="vqa", category=category, source="synthetic"), "frames": frames, "video_fps": FPS}


def key_distance(processor, sample: dict) -> int:
    """Tokens from the key's last token to the end of the prompt (the position that generates the answer),
    counted with `processor` on the runner's own prompt."""
    ids = _prompt_ids(processor, sample, videos=[sample["frames"]], video_fps=sample["video_fps"])
    video = [i for i, t in enumerate(ids) if t == processor.video_token_id]
    key_patch = next(t for t in range(0, len(sample["frames"]), TEMPORAL_PATCH)
                     if sample["frames"][t].getpixel((0, 0)) == (255, 255, 255))
    per_patch = len(video) // math.ceil(len(sample["frames"]) / TEMPORAL_PATCH)
    last_key_token = video[(key_patch // TEMPORAL_PATCH + 1) * per_patch - 1]
    return len(ids) - 1 - last_key_token


def _prompt_ids(processor, sample: dict, **media) -> list[int]:
    """The token ids of the runner's own prompt for `sample`, with its media, up to the answer's first position."""
    from .runner import build_messages, build_prompt

    text = processor.apply_chat_template(build_messages(sample, build_prompt(sample)), add_generation_prompt=True)
    return processor(text=text, **media)["input_ids"][0].tolist()


# -- dense text -------------------------------------------------------------------------------------------------
def dense_text(rng: random.Random) -> tuple[Image.Image, list[tuple[str, str]]]:
    """One to three strings, one a line, a character a cell (TEXT_CELL), each line starting at a drawn cell; two
    questions, each naming a line to read."""
    n_lines = rng.choice((1, 2, 2, 3, 3))
    lines = ["".join(rng.choice(TEXT_ALPHABET) for _ in range(rng.randint(*TEXT_LENGTHS))) for _ in range(n_lines)]
    image = Image.new("RGB", TEXT_SIZE, "white")
    draw = ImageDraw.Draw(image)
    font = _font(TEXT_TYPE)
    for row, text in enumerate(lines):
        start = rng.randint(0, TEXT_COLUMNS - len(text))
        for k, char in enumerate(text):
            centre = ((start + k + 0.5) * TEXT_CELL, (row + 0.5) * TEXT_CELL)
            draw.text(centre, char, fill="black", font=font, anchor="mm")
    if n_lines == 1:
        return image, [("what does the text say?", lines[0]), ("what is written on the first line?", lines[0])]
    a, b = rng.sample(range(n_lines), 2)
    return image, [(f"what is written on the {LINE_NAMES[a]} line?", lines[a]),
                   (f"what is written on the {LINE_NAMES[b]} line?", lines[b])]


def text_sample(index: int, seed: int = HELD_OUT_SEED) -> dict:
    """A held-out dense-text question (the first of its picture's two)."""
    from .dataset import encode_image

    image, qa = dense_text(random.Random(f"dense_text/{seed}/{index}"))
    question, answer = qa[0]
    return make_sample(id=f"dense_text/{index}", suite="mechanisms", image=encode_image(image), question=question,
                       answers=[answer] * 10, metric="vqa", category="dense_text", source="synthetic")


def text_distance(processor, sample: dict) -> int:
    """Tokens from the asked line's first character to the end of the prompt (the position that generates the
    answer's first character; each later character is as far from its own cell), counted with `processor` on the
    runner's own prompt: what a sliding window must reach to read the line. The line is the one the question
    names (the first where it names none); its start, the first cell of that row with ink."""
    from .dataset import decode_image

    image = decode_image(sample["image"]) if isinstance(sample["image"], bytes) else sample["image"]
    row = next((i for i, name in enumerate(LINE_NAMES) if f"the {name} line" in sample["question"]), 0)
    band = image.convert("L").crop((0, row * TEXT_CELL, TEXT_SIZE[0], (row + 1) * TEXT_CELL))
    start = next((c for c in range(TEXT_COLUMNS)
                  if band.crop((c * TEXT_CELL, 0, (c + 1) * TEXT_CELL, TEXT_CELL)).getextrema()[0] < 128), None)
    if start is None:
        raise ValueError(f"{sample['id']}: no character drawn on line {row + 1} of the picture")
    ids = _prompt_ids(processor, sample, images=[image])
    cells = [i for i, t in enumerate(ids) if t == processor.image_token_id]
    if len(cells) != TEXT_COLUMNS * TEXT_SIZE[1] // TEXT_CELL:
        raise ValueError(f"{sample['id']}: the processor made {len(cells)} image tokens of the "
                         f"{TEXT_SIZE[0]}x{TEXT_SIZE[1]} picture, not a token a cell (its max_pixels is too small)")
    return len(ids) - 1 - cells[row * TEXT_COLUMNS + start]


def char_accuracy(prediction: str, answer: str) -> float:
    """1 - (edit distance / answer length), floored at 0: the share of the answer's characters read right
    (the complement of the character error rate), on the VQA-normalised strings."""
    pred, ref = normalize_vqa_answer(prediction), normalize_vqa_answer(answer)
    if not ref:
        return float(pred == ref)
    return max(0.0, 1.0 - levenshtein(pred, ref) / len(ref))


def text_scores(samples_jsonl: str) -> dict:
    """Exact match and mean character accuracy (percent) of a scored dense-text suite's samples.jsonl."""
    from pipeline import storage

    records = storage.read_jsonl(samples_jsonl, missing_ok=False)
    n = len(records)
    exact = sum(r["score"] for r in records)
    chars = sum(char_accuracy(r["prediction"], r["answers"][0]) for r in records)
    return {"n": n, "exact": 100 * exact / n if n else 0.0, "char_accuracy": 100 * chars / n if n else 0.0}


# -- the sweeps -------------------------------------------------------------------------------------------------
@dataclass
class MechanismsConfig:
    """What bench/mechanisms.py scores each checkpoint on."""
    distances: list[int] = field(default_factory=lambda: [2, 8, 24, 56, 120, 248, 504])  # distractor frames
    frame_counts: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512, 1024])
    recall_samples: int = 32     # per distance and per frame count
    text_samples: int = 128
    batch_size: int = 16

    @classmethod
    def from_dict(cls, values: dict | None) -> "MechanismsConfig":
        return cls(**(values or {}))


def score_mechanisms(model, processor, out_dir: str, config: MechanismsConfig, frames_sweep: bool = True,
                     model_name: str = "") -> dict:
    """Recall accuracy per distance (with its distance in tokens), text exact match and character accuracy,
    and (with `frames_sweep`) recall accuracy per frame count; percent."""
    from .runner import EvalConfig, run_suite

    eval_config = EvalConfig(batch_size=config.batch_size, max_new_tokens=16)
    out = {"recall_by_distance": [], "frames": []}
    for d in config.distances:
        samples = [recall_sample(d, i) for i in range(config.recall_samples)]
        r = run_suite(model, processor, samples, f"recall_d{d}", out_dir, eval_config, model_name)
        out["recall_by_distance"].append({"distractor_frames": d, "tokens": key_distance(processor, samples[0]),
                                          "accuracy": r["score"]})
    texts = [text_sample(i) for i in range(config.text_samples)]
    run_suite(model, processor, texts, "dense_text", out_dir, eval_config, model_name)
    out["text"] = text_scores(f"{out_dir.rstrip('/')}/dense_text/samples.jsonl")
    out["text"]["distances"] = [text_distance(processor, s) for s in texts]  # what a window must reach, a question
    if frames_sweep:
        for n in config.frame_counts:
            samples = [recall_sample(0, i, n_frames=n) for i in range(config.recall_samples)]
            r = run_suite(model, processor, samples, f"frames_{n}", out_dir, eval_config, model_name)
            out["frames"].append({"frames": n, "accuracy": r["score"]})
    return out


_FONTS: dict[int, ImageFont.FreeTypeFont] = {}


def _font(size: int = 10):
    """Pillow's built-in font at `size` pixels (the same glyphs on every machine: nothing is read from the system)."""
    if size not in _FONTS:
        _FONTS[size] = ImageFont.load_default(size=size)
    return _FONTS[size]
