"""Synthetic corpora written exactly as the paper's datasets are published, for tests and the bench.

The content is the learnable sample data of `pipeline.data.synthetic` (shapes, charts, text lines, a
moving square); the layout is each dataset's own: folder and file names, Parquet schema and nesting,
JSON structure, media path conventions (docs/datasets.md describes them):

    FineVision/<subset>/train-00000-of-00002.parquet            images [{bytes, path}], texts [{user,
                                                                assistant}], source, four ratings per turn
    LLaVA-OneVision-Data/<subset>/train-00000-of-00001.parquet  id, image {bytes, path} (null: text only),
                                                                conversations [{from, value}], data_source
    llava_v1_5_mix665k.json + coco/train2017/…, gqa/images/…,   one JSON list; image paths relative to the
      ocr_vqa/images/…, textvqa/train_images/…, vg/VG_100K/…    list's folder; text-only records
    LLaVA-Video-178K/<bucket>_<origin>_v0_1/                    one JSON list per kind (caption, open-ended,
      <bucket>_<origin>_v0_1_cap_processed.json, …_oe_…,        multiple choice); `video` relative to the
      …_mc_…, and the videos: academic_source/Charades/X.mp4,   subset folder, where the archives unpack;
      liwei_youtube_videos/videos/youtube_video_2024/ytb_X.mp4  `<image>` marks the video
"""

from __future__ import annotations

import io
import json
import random
import string
from pathlib import Path

from PIL import Image

from .synthetic import NUMBERS, PICTURES, moving_object_frames, write_video

RATINGS = ("relevance", "visual_dependency", "image_correspondence", "formatting")


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _picture(rng: random.Random, i: int, sizes: list[tuple[int, int]] | None):
    maker = PICTURES[i % len(PICTURES)]
    return maker(rng, sizes[i % len(sizes)]) if sizes else maker(rng)


def _files(root: Path, rows: list[dict], rows_per_file: int | None, row_group_size: int | None, schema) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    per = rows_per_file or max(1, len(rows))
    n = max(1, -(-len(rows) // per))
    for k in range(n):
        part = rows[k * per:(k + 1) * per]
        pq.write_table(pa.Table.from_pylist(part, schema=schema), root / f"train-{k:05d}-of-{n:05d}.parquet",
                       row_group_size=row_group_size)


# -- FineVision ---------------------------------------------------------------------------------------------------
def finevision_schema():
    import pyarrow as pa

    fields = [("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
              ("texts", pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string())]))),
              ("source", pa.string())]
    for name in RATINGS:
        fields += [(f"{name}_ratings", pa.list_(pa.int64())), (f"{name}_min", pa.int64())]
    return pa.schema(fields)


def write_finevision(root: str | Path, subsets: dict[str, int] | None = None, seed: int = 0,
                     sizes: list[tuple[int, int]] | None = None, rows_per_file: int | None = None,
                     row_group_size: int | None = None, image_format: str = "PNG") -> Path:
    """FineVision subsets (name -> rows); a subset named text_* holds text-only rows, as FineVision's do."""
    base = Path(root) / "FineVision"
    rng = random.Random(seed)
    for subset, n in (subsets or {"CoSyn_400k_chart": 6, "ai2d_merged": 4, "text_openhermes_2_5": 3}).items():
        rows = []
        for i in range(n):
            if subset.startswith("text_"):
                a, b = rng.randint(1, 9), rng.randint(1, 9)
                images, qa = [], [(f"what is {NUMBERS[a]} plus {NUMBERS[b]}?", str(a + b))]
            else:
                image, qa = _picture(rng, i, sizes)
                images = [{"bytes": encode(image, image_format), "path": None}]
            row = {"images": images, "texts": [{"user": q, "assistant": a} for q, a in qa], "source": subset}
            for name in RATINGS:
                ratings = [rng.randint(1, 5) for _ in qa]
                row[f"{name}_ratings"], row[f"{name}_min"] = ratings, min(ratings)
            rows.append(row)
        _files(base / subset, rows, rows_per_file, row_group_size, finevision_schema())
    return base


# -- LLaVA-OneVision-Data -------------------------------------------------------------------------------------------
def onevision_schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
                      ("data_source", pa.string())])


def write_onevision(root: str | Path, subsets: dict[str, int] | None = None, seed: int = 0,
                    sizes: list[tuple[int, int]] | None = None, rows_per_file: int | None = None,
                    row_group_size: int | None = None, image_format: str = "JPEG") -> Path:
    """LLaVA-OneVision-Data subsets (name -> rows); magpie_* subsets are text-only (image null)."""
    base = Path(root) / "LLaVA-OneVision-Data"
    rng = random.Random(seed)
    subsets = subsets or {"CLEVR-Math(MathV360K)": 5, "ai2d(cauldron,llava_format)": 3, "magpie_pro(l3_80b_mt)": 2}
    for subset, n in subsets.items():
        rows = []
        for i in range(n):
            if subset.startswith("magpie"):
                a, b = rng.randint(1, 9), rng.randint(1, 9)
                qa = [(f"what is {NUMBERS[a]} times {NUMBERS[b]}?", str(a * b))]
                rows.append({"id": f"{subset}_{i}", "image": None, "data_source": subset,
                             "conversations": _llava_turns(qa, "")})
                continue
            image, qa = _picture(rng, i, sizes)
            name = f"{subset.split('(')[0]}_{i:06d}.{'jpg' if image_format == 'JPEG' else 'png'}"
            rows.append({"id": f"{subset}/{name}", "image": {"bytes": encode(image, image_format), "path": name},
                         "conversations": _llava_turns(qa, "<image>\n"), "data_source": subset})
        _files(base / subset, rows, rows_per_file, row_group_size, onevision_schema())
    return base


def _llava_turns(qa: list[tuple[str, str]], placeholder: str) -> list[dict]:
    turns = []
    for i, (q, a) in enumerate(qa):
        turns += [{"from": "human", "value": (placeholder if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return turns


# -- LLaVA-1.5 ---------------------------------------------------------------------------------------------------
LLAVA_IMAGE_FOLDERS = ("coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K")


def write_llava15(root: str | Path, n: int = 8, seed: int = 0, sizes: list[tuple[int, int]] | None = None,
                  text_only_every: int = 4, indent: int | None = 2) -> Path:
    """LLaVA-1.5's instruction file with its image folders; every `text_only_every`-th record has no image,
    as the ShareGPT conversations of the mix have none."""
    root = Path(root)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        if text_only_every and i % text_only_every == text_only_every - 1:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            qa = [(f"what is {NUMBERS[a]} minus {NUMBERS[b]}?", str(a - b)), ("and plus?", str(a + b))]
            sid = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(7))
            records.append({"id": f"{sid}_{i % 3}", "conversations": _llava_turns(qa, "")})
            continue
        image, qa = _picture(rng, i, sizes)
        folder = LLAVA_IMAGE_FOLDERS[i % len(LLAVA_IMAGE_FOLDERS)]
        stem = f"{i:012d}" if folder.startswith("coco") else f"{rng.getrandbits(40):x}"
        (root / folder).mkdir(parents=True, exist_ok=True)
        image.convert("RGB").save(root / folder / f"{stem}.jpg", quality=90)
        records.append({"id": stem, "image": f"{folder}/{stem}.jpg", "conversations": _llava_turns(qa, "<image>\n")})
    path = root / "llava_v1_5_mix665k.json"
    path.write_text(json.dumps(records, indent=indent))
    return path


# -- LLaVA-Video-178K ------------------------------------------------------------------------------------------------
def write_llava_video(root: str | Path, subsets: dict[str, int] | None = None, seed: int = 0,
                      seconds: float = 2.0, fps: int = 8, size: tuple[int, int] = (112, 112)) -> Path:
    """LLaVA-Video-178K subsets (<bucket>_<origin>_v0_1 -> videos), each video with one caption, one
    open-ended (two questions) and one multiple-choice record."""
    base = Path(root) / "LLaVA-Video-178K"
    rng = random.Random(seed)
    for subset, n in (subsets or {"0_30_s_academic_v0_1": 2, "0_30_s_youtube_v0_1": 2}).items():
        folder = base / subset
        prefix = subset.removesuffix("_v0_1")
        kinds = {"cap": [], "oe": [], "mc": []}
        for i in range(n):
            frames, qa = moving_object_frames(rng, int(seconds * fps), size)
            direction, color = qa[0][1], qa[1][1]
            if "youtube" in subset:
                vid = "".join(rng.choice(string.ascii_letters + string.digits + "-_") for _ in range(11))
                video = f"liwei_youtube_videos/videos/youtube_video_2024/ytb_{vid}.mp4"
            else:
                vid = "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(5))
                video = f"academic_source/Charades/{vid}.mp4"
            (folder / video).parent.mkdir(parents=True, exist_ok=True)
            write_video(folder / video, frames, fps=fps)
            common = {"data_source": subset, "video": video}
            kinds["cap"].append({"id": vid, "conversations": _llava_turns(
                [("Please describe this video in detail.", f"A {color} square moves to the {direction}.")],
                "<image>\n"), **common})
            kinds["oe"].append({"id": vid, "conversations": _llava_turns(qa, "<image>\n"), **common})
            options = ["left", "right"]
            letter = "AB"[options.index(direction)]
            kinds["mc"].append({"id": vid, "conversations": _llava_turns(
                [("Which way does the object move?\nA. left\nB. right\nAnswer with the option's letter from the "
                  "given choices directly.", f"{letter}.")], "<image>\n"), **common})
        for kind, records in kinds.items():
            name = f"{subset}_cap_processed.json" if kind == "cap" else f"{prefix}_{kind}_v0_1_qa_processed.json"
            (folder / name).write_text(json.dumps(records, indent=4))
    return base
