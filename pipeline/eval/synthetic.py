"""The built-in suites drawn in code, so the default CPU run and CI can score a checkpoint end to end.

  tiny      small image questions, one kind per metric. A trained model should answer most of these; a
            random one scores about zero.
  pictures  held-out questions on the sample-data generator's pictures (count the shapes, read the chart,
            read the text): the tasks `teacher.train` trains the tiny teacher on, scored the same way for
            the teacher and for every student checkpoint, so their ratio is the retention.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from .dataset import encode_image, make_sample
from .metrics import LETTERS

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (235, 200, 20),
          "purple": (140, 50, 170), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "sun", "tree", "book", "moon", "fish", "door", "lamp")
SIZE = 56


def tiny_samples(per_kind: int = 4, seed: int = 0) -> list[dict]:
    """`per_kind` samples of each kind, the same for the same seed.

    Kinds take turns, so the first N samples (a run's sample limit) still cover every metric.
    """
    rng = random.Random(seed)
    makers = (_colour_question, _count_question, _shape_question, _word_question, _read_question)
    return [make(rng, i) for i in range(per_kind) for make in makers]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (SIZE, SIZE), "white")
    return image, ImageDraw.Draw(image)


def _colour_question(rng: random.Random, i: int) -> dict:
    name = rng.choice(sorted(COLORS))
    image, draw = _canvas()
    draw_shape(draw, "square", (12, 12, 44, 44), COLORS[name])
    return make_sample(id=f"colour/{i}", suite="tiny", image=encode_image(image), question="What color is the square?",
                       answers=[name] * 10, metric="vqa", category="colour")


def _count_question(rng: random.Random, i: int) -> dict:
    count = rng.randint(1, 4)
    image, draw = _canvas()
    for k in range(count):
        x, y = 4 + (k % 2) * 26, 4 + (k // 2) * 26
        draw.ellipse((x, y, x + 20, y + 20), fill=COLORS["blue"])
    return make_sample(id=f"count/{i}", suite="tiny", image=encode_image(image),
                       question="How many circles are there?", answers=[str(count)], metric="relaxed",
                       category="count")


def _shape_question(rng: random.Random, i: int) -> dict:
    shape = rng.choice(SHAPES)
    options = list(SHAPES)
    rng.shuffle(options)
    image, draw = _canvas()
    draw_shape(draw, shape, (10, 10, 46, 46), COLORS["green"])
    return make_sample(id=f"shape/{i}", suite="tiny", image=encode_image(image), question="Which shape is shown?",
                       options=options, answers=[LETTERS[options.index(shape)]], metric="mc", category="shape")


def _word_image(word: str) -> bytes:
    image, draw = _canvas()
    draw.text((8, 20), word, fill="black")
    return encode_image(image)


def _word_question(rng: random.Random, i: int) -> dict:
    word = rng.choice(WORDS)
    return make_sample(id=f"word/{i}", suite="tiny", image=_word_image(word), question="what is written in the image?",
                       answers=[word], metric="ocrbench", category="word", source="tiny")


def _read_question(rng: random.Random, i: int) -> dict:
    word = rng.choice(WORDS)
    return make_sample(id=f"read/{i}", suite="tiny", image=_word_image(word), question="Which word does the page say?",
                       answers=[word], metric="anls", category="read")


# -- the held-out picture questions (the tasks the proof teacher is trained on) -----------------------------------
# The sample-data generator's pictures (pipeline/data/synthetic.py): every maker returns two questions in a
# fixed order; these name them, one category per kind of question.
PICTURE_KINDS = {
    "shapes": ("shapes/count", "shapes/color"),
    "bar_chart": ("bar_chart/highest", "bar_chart/lowest"),
    "line_chart": ("line_chart/trend", "line_chart/last_value"),
    "text_line": ("text_line/read", "text_line/first_word"),
    # the mechanisms suite's (pipeline/eval/mechanisms.py): asked for by name, never part of the default
    "recall": ("recall/what", "recall/detail"),
    "dense_text": ("dense_text/line", "dense_text/other_line"),
}
DEFAULT_KINDS = ("shapes", "bar_chart", "line_chart", "text_line")
# Held-out pictures are drawn from this seed on; training draws from seeds below it, so none is shared.
HELD_OUT_SEED = 1_000_000


def picture_samples(n_pictures: int = 64, seed: int = HELD_OUT_SEED, images_as: str = "png",
                    kinds: list[str] | tuple[str, ...] | None = None, max_frames: int = 64,
                    min_frames: int | None = None) -> list[dict]:
    """Two questions per picture, the makers taking turns, scored by exact match after the VQA normalisation
    (metric "vqa" with the answer given ten times). `images_as="pil"` keeps the PIL images (for training);
    `kinds` keeps only those makers (names of PICTURE_KINDS; None: DEFAULT_KINDS). A `recall` picture is a frame
    stream of `min_frames` (default: the fewest a stream has) to `max_frames` frames, carried as in-memory
    `frames` (PIL whatever `images_as`)."""
    from pipeline.data.synthetic import PICTURES

    from .mechanisms import FPS, MIN_FRAMES, dense_text, recall

    unknown = sorted(set(kinds or ()) - set(PICTURE_KINDS))
    if unknown:
        raise ValueError(f"unknown picture kinds {unknown}; known: {', '.join(PICTURE_KINDS)}")
    makers = [m for m in [*PICTURES, recall, dense_text] if m.__name__ in (kinds or DEFAULT_KINDS)]
    rng = random.Random(seed)
    samples = []
    for i in range(n_pictures):
        maker = makers[i % len(makers)]
        image, qa = maker(rng, max_frames, min_frames or MIN_FRAMES) if maker is recall else maker(rng)
        frames = image if isinstance(image, list) else None
        stored = None if frames else image if images_as == "pil" else encode_image(image)
        for kind, (question, answer) in zip(PICTURE_KINDS[maker.__name__], qa):
            sample = make_sample(id=f"{kind}/{i}", suite="pictures", image=stored, question=question,
                                 answers=[answer] * 10, metric="vqa", category=kind, source="synthetic")
            samples.append({**sample, "frames": frames, "video_fps": FPS} if frames else sample)
    return samples
