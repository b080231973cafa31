"""Synthetic but learnable sample data: every answer is determined by the picture.

Kinds: shapes to count, bar and line charts, rendered text lines, multi-page documents (PDF or page
folders) and short videos of a moving object. Each writer puts files under a local folder in one of
the source formats the data stage reads, so the same generator feeds the default tiny run and the
tests. Everything is seeded; the words come from the tiny tokenizer's vocabulary.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
          "black": (20, 20, 20)}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SHAPES = ["circle", "square", "triangle"]
WORDS = ("red green blue yellow black white left right top bottom first last page title chart bar line "
         "value word document video frame count number shapes object scene").split()


# -- pictures and their questions -----------------------------------------------------------------------------
def shapes(rng: random.Random, size: tuple[int, int] = (224, 224)) -> tuple[Image.Image, list[tuple[str, str]]]:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    kind, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    n = rng.randint(1, 6)
    cells = rng.sample(range(16), n)
    cw, ch = size[0] // 4, size[1] // 4
    for c in cells:
        x, y = (c % 4) * cw + cw // 6, (c // 4) * ch + ch // 6
        box = (x, y, x + cw * 2 // 3, y + ch * 2 // 3)
        if kind == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif kind == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLORS[color])
    return image, [(f"how many {kind}s are there in the picture?", NUMBERS[n]),
                   (f"what color are the {kind}s?", color)]


def bar_chart(rng: random.Random, size: tuple[int, int] = (256, 192)) -> tuple[Image.Image, list[tuple[str, str]]]:
    names = rng.sample(list(COLORS), 4)
    values = rng.sample(range(1, 10), 4)
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    w = size[0] // 5
    for i, (name, v) in enumerate(zip(names, values)):
        x = w // 2 + i * w
        draw.rectangle((x, size[1] - 20 - v * (size[1] - 40) // 10, x + w * 2 // 3, size[1] - 20), fill=COLORS[name])
    best = names[values.index(max(values))]
    worst = names[values.index(min(values))]
    return image, [("which bar is highest in the chart?", best), ("which bar is lowest in the chart?", worst)]


def line_chart(rng: random.Random, size: tuple[int, int] = (256, 192)) -> tuple[Image.Image, list[tuple[str, str]]]:
    values = [rng.randint(0, 9) for _ in range(6)]
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    pts = [(20 + i * (size[0] - 40) // 5, size[1] - 20 - v * (size[1] - 40) // 9) for i, v in enumerate(values)]
    draw.line(pts, fill=COLORS["blue"], width=3)
    trend = "up" if values[-1] > values[0] else "down" if values[-1] < values[0] else "flat"
    return image, [("does the line end higher or lower than it starts?",
                    {"up": "higher", "down": "lower", "flat": "the same"}[trend]),
                   ("what is the value of the last point?", str(values[-1]))]


def text_line(rng: random.Random, size: tuple[int, int] = (320, 64)) -> tuple[Image.Image, list[tuple[str, str]]]:
    words = rng.sample(WORDS, 3)
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((10, size[1] // 3), " ".join(words), fill="black")
    return image, [("what does the text say?", " ".join(words)), ("what is the first word?", words[0])]


def page(rng: random.Random, number: int, size: tuple[int, int] = (224, 288)) -> tuple[Image.Image, str]:
    title = " ".join(rng.sample(WORDS, 2))
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((12, 10), f"page {number}: {title}", fill="black")
    for i in range(8):
        draw.text((12, 40 + i * 28), " ".join(rng.sample(WORDS, 4)), fill=(60, 60, 60))
    return image, title


PICTURES = [shapes, bar_chart, line_chart, text_line]
VIDEO_FPS = 2  # the rate frame streams are written at, and read back at (pipeline/data/stage.py)


def moving_object_frames(rng: random.Random, n_frames: int, size: tuple[int, int] = (112, 112)):
    """Frames of a square crossing the picture; the answer is its direction and color."""
    color = rng.choice(list(COLORS))
    direction = rng.choice(["left", "right"])
    frames = []
    for i in range(n_frames):
        frac = i / max(1, n_frames - 1)
        x = int((frac if direction == "right" else 1 - frac) * (size[0] - 24))
        im = Image.new("RGB", size, "white")
        ImageDraw.Draw(im).rectangle((x, size[1] // 2 - 12, x + 24, size[1] // 2 + 12), fill=COLORS[color])
        frames.append(im)
    return frames, [("which way does the object move?", direction), ("what color is the object?", color)]


# -- encoders ---------------------------------------------------------------------------------------------------
def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_video(path: str | Path, frames: list[Image.Image], fps: int = 8, codec: str = "mpeg4") -> None:
    from .media import media_module

    av = media_module("av", f"writing the sample video {path}")

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for im in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(im), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_pdf(path: str | Path, pages: list[Image.Image]) -> None:
    # fixed dates: the same pages give the same file
    pages[0].save(str(path), format="PDF", save_all=True, append_images=pages[1:], resolution=72.0,
                  creationDate="D:20260101000000", modDate="D:20260101000000")


def _conversation(qa: list[tuple[str, str]], placeholder: str) -> list[dict]:
    turns = []
    for i, (q, a) in enumerate(qa):
        turns.append({"from": "human", "value": f"{placeholder}\n{q}" if i == 0 and placeholder else q})
        turns.append({"from": "gpt", "value": a})
    return turns


# -- sources ----------------------------------------------------------------------------------------------------
def write_llava(root: str | Path, n: int, seed: int = 0, fmt: str = "jsonl",
                sizes: list[tuple[int, int]] | None = None) -> Path:
    """LLaVA-style annotations (.jsonl or .json) with images under root/images (of `sizes`, cycled)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        kind = PICTURES[i % len(PICTURES)]
        image, qa = kind(rng, sizes[i % len(sizes)]) if sizes else kind(rng)
        name = f"images/{i:05d}.png"
        image.save(root / name)
        records.append({"id": f"{kind.__name__}-{i}", "image": name, "conversations": _conversation(qa, "<image>")})
    path = root / f"annotations.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    return path


def write_picture_questions(root: str | Path, n_pictures: int, seed: int = 0, kinds=None, max_frames: int = 64) -> Path:
    """One single-turn LLaVA record per question on `n_pictures` pictures, worded exactly as the held-out
    `pictures` eval suite asks them (pipeline/eval/synthetic.py: the question plus the eval prompt's
    instruction), so distilling and fine-tuning on them trains the format the suite scores. A frame stream
    (the `recall` kind, at most `max_frames` frames) is written losslessly (FFV1) at its own rate, VIDEO_FPS."""
    from pipeline.eval.runner import build_prompt
    from pipeline.eval.synthetic import HELD_OUT_SEED, picture_samples

    if seed >= HELD_OUT_SEED:
        raise ValueError(f"seed {seed} would draw held-out pictures: training seeds stay below {HELD_OUT_SEED}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, sample in enumerate(picture_samples(n_pictures, seed, images_as="pil", kinds=kinds, max_frames=max_frames)):
        if sample.get("frames"):
            name, media, tag = f"videos/{i // 2:05d}.mkv", "video", "<video>"
            if i % 2 == 0:  # the two questions of a picture share its file
                (root / "videos").mkdir(exist_ok=True)
                write_video(root / name, sample["frames"], fps=VIDEO_FPS, codec="ffv1")
        else:
            name, media, tag = f"images/{i // 2:05d}.png", "image", "<image>"
            if i % 2 == 0:
                sample["image"].save(root / name)
        records.append({"id": sample["id"], media: name, "conversations": [
            {"from": "human", "value": tag + build_prompt(sample)}, {"from": "gpt", "value": sample["answers"][0]}]})
    path = root / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(root: str | Path, n: int, seed: int = 0, rows_per_file: int | None = None) -> Path:
    """The Cauldron / FineVision layout: `images` as [{bytes, path}], `texts` as [{user, assistant}]."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        image, qa = PICTURES[i % len(PICTURES)](rng)
        rows.append({"images": [{"bytes": png_bytes(image), "path": f"{i}.png"}],
                     "texts": [{"user": q, "assistant": a, "source": "synthetic"} for q, a in qa]})
    per = rows_per_file or n
    for k in range(0, n, per):
        pq.write_table(pa.Table.from_pylist(rows[k:k + per]), root / f"train-{k // per:05d}.parquet")
    return root


def write_videos(root: str | Path, n: int, seed: int = 0, seconds: float = 2.0, fps: int = 8) -> Path:
    root = Path(root)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        frames, qa = moving_object_frames(rng, int(seconds * fps))
        name = f"videos/{i:05d}.mp4"
        write_video(root / name, frames, fps=fps)
        records.append({"id": f"video-{i}", "video": name, "conversations": _conversation(qa, "<video>")})
    path = root / "videos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_documents(root: str | Path, n: int, seed: int = 0, pages: int = 3, pdf: bool = True) -> Path:
    """Multi-page documents as PDFs or as folders of page images, with questions about one page."""
    root = Path(root)
    (root / "docs").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        rendered = [page(rng, p + 1) for p in range(pages)]
        if pdf:
            name = f"docs/{i:05d}.pdf"
            write_pdf(root / name, [im for im, _ in rendered])
        else:
            name = f"docs/{i:05d}"
            (root / name).mkdir(exist_ok=True)
            for p, (im, _) in enumerate(rendered):
                im.save(root / name / f"page{p + 1}.png")
        asked = rng.randrange(pages)
        qa = [(f"what is the title of page {asked + 1}?", rendered[asked][1]),
              ("how many pages does the document have?", NUMBERS[pages])]
        records.append({"id": f"doc-{i}", "document": name, "conversations": _conversation(qa, "<document>")})
    path = root / "documents.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_sample_corpora(root: str | Path, seed: int = 0, n_images: int = 64, n_videos: int = 8,
                         n_documents: int = 8) -> dict[str, dict]:
    """All kinds under `root`; returns source configs (as dicts) for each, keyed by source name."""
    root = Path(root)
    return {
        "pictures": {"name": "pictures", "format": "llava", "path": str(write_llava(root / "pictures", n_images, seed))},
        "cauldron": {"name": "cauldron", "format": "parquet",
                     "path": str(write_parquet(root / "cauldron", n_images, seed + 1))},
        "videos": {"name": "videos", "format": "llava", "path": str(write_videos(root / "videos", n_videos, seed + 2))},
        "documents": {"name": "documents", "format": "llava",
                      "path": str(write_documents(root / "documents", n_documents, seed + 3))},
    }


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write synthetic sample corpora.")
    parser.add_argument("root")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--documents", type=int, default=32)
    args = parser.parse_args()
    sources = write_sample_corpora(args.root, args.seed, args.images, args.videos, args.documents)
    print(json.dumps(list(sources.values()), indent=2))


if __name__ == "__main__":
    main()
