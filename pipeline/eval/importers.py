"""Importers: each benchmark's published files → samples in the eval format (see dataset.py).

Every importer takes fsspec URLs and yields samples; `import_benchmark` writes them to one Arrow file.
Images are stored as the published encoded bytes, so nothing is re-compressed.
"""

from __future__ import annotations

import ast
import base64
import csv
import io
import json
import posixpath
import sys
from typing import Callable, Iterator

from pipeline import storage

from .dataset import make_sample, write_samples
from .metrics import LETTERS, METRICS


def import_benchmark(layout: str, src: str, out_url: str, **options) -> int:
    """Imports `src` in the named published layout into the Arrow eval file `out_url`; returns the count."""
    if layout not in IMPORTERS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(sorted(IMPORTERS))}")
    return write_samples(IMPORTERS[layout](src, **options), out_url)


# -- DocVQA ---------------------------------------------------------------------------------------------------

def import_docvqa(json_url: str, image_root: str | None = None, suite: str = "docvqa") -> Iterator[dict]:
    """`{"data": [{questionId, question, image: "documents/x.png", answers, question_types}]}`.

    Image paths are relative to the folder holding the json unless `image_root` is given. The test split
    ships without answers; those samples get an empty answer list.
    """
    root = image_root or _parent(json_url)
    for item in _read_json(json_url)["data"]:
        yield make_sample(
            id=str(item["questionId"]), suite=suite, image=_read_bytes(_join(root, item["image"])),
            question=item["question"], answers=[str(a) for a in item.get("answers", [])], metric="anls",
            category="/".join(item.get("question_types", [])),
        )


# -- TextVQA --------------------------------------------------------------------------------------------------

def import_textvqa(json_url: str, image_root: str, suite: str = "textvqa",
                   image_ext: str = ".jpg") -> Iterator[dict]:
    """`TextVQA_0.5.1_val.json`: `{"data": [{question_id, question, image_id, answers (10)}]}`.

    Images are `<image_root>/<image_id>.jpg` (the val split's images sit in train_images/).
    """
    for item in _read_json(json_url)["data"]:
        yield make_sample(
            id=str(item["question_id"]), suite=suite, image=_read_bytes(_join(image_root, item["image_id"] + image_ext)),
            question=item["question"], answers=[str(a) for a in item.get("answers", [])], metric="vqa",
        )


# -- ChartQA --------------------------------------------------------------------------------------------------

def import_chartqa(json_url: str, image_root: str | None = None, suite: str = "chartqa",
                   source: str | None = None) -> Iterator[dict]:
    """`test/test_human.json` or `test_augmented.json`: `[{imgname, query, label}]`, images in `test/png/`.

    Given the split folder itself (`test/`), both files are imported: ChartQA's headline number is the
    relaxed accuracy over human and augmented questions together (the mean of two equal-sized halves).
    `source` (default: "human"/"augmented" from the file name) keeps them apart as report categories.
    """
    if not json_url.endswith(".json"):
        split = posixpath.basename(json_url.rstrip("/"))
        for part in ("human", "augmented"):
            yield from import_chartqa(_join(json_url, f"{split}_{part}.json"), image_root, suite)
        return
    root = image_root or _join(_parent(json_url), "png")
    name = posixpath.basename(json_url).rsplit(".", 1)[0]
    source = source or name.replace("test_", "").replace("val_", "")
    for i, item in enumerate(_read_json(json_url)):
        yield make_sample(
            id=f"{source}/{i}", suite=suite, image=_read_bytes(_join(root, item["imgname"])),
            question=item["query"], answers=[str(item["label"])], metric="relaxed", category=source, source=source,
        )


# -- MMBench and other VLMEvalKit-style multiple-choice TSVs (AI2D_TEST too) -------------------------------------

def import_mc_tsv(tsv_url: str, suite: str = "mmbench", circular: bool = False) -> Iterator[dict]:
    """TSV with index, question, hint, A, B, C, D (…), answer, category, image (base64), l2-category, ….

    An image cell of at most 64 characters is the index of the row whose image it reuses (how VLMEvalKit
    deduplicates). With `circular`, every question is repeated with its options rotated (MMBench's
    CircularEval); the rotations share a group and the answer letter follows its option.
    """
    rows = list(_read_tsv(tsv_url))
    images = {row["index"]: row["image"] for row in rows if len(row.get("image", "")) > 64}
    for row in rows:
        image = row.get("image", "")
        image = images.get(image, image) if len(image) <= 64 else image
        options = [row[c] for c in LETTERS if _present(row.get(c))]
        answer = (row.get("answer") or "").strip()
        category = row.get("category") or row.get("l2-category") or ""
        hint = row.get("hint") if _present(row.get("hint")) else ""
        base = dict(suite=suite, image=base64.b64decode(image) if image else None, question=row["question"],
                    hint=hint, metric="mc", category=category, source=row.get("source") or "")
        if not circular:
            yield make_sample(id=row["index"], answers=[answer] if answer else [], options=options, **base)
            continue
        for shift in range(len(options)):
            rotated = options[shift:] + options[:shift]
            new_answer = LETTERS[(LETTERS.index(answer) - shift) % len(options)] if answer else ""
            yield make_sample(id=row["index"] if shift == 0 else f"{row['index']}@{shift}", group=row["index"],
                              answers=[new_answer] if new_answer else [], options=rotated, **base)


def import_vqa_tsv(tsv_url: str, suite: str, metric: str) -> Iterator[dict]:
    """VLMEvalKit's open-answer TSVs (DocVQA_VAL, TextVQA_VAL, ChartQA_TEST, OCRBench, InfoVQA_VAL, …):
    index, image (base64), question, answer, category.

    `answer` holds one answer or a Python list literal of several (the ten TextVQA answers). `metric`
    says how the benchmark scores them (anls, vqa, relaxed, ocrbench): the TSVs do not say.
    """
    if metric not in METRICS:  # checked now, before an output file is opened
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return _vqa_tsv_samples(tsv_url, suite, metric)


def _vqa_tsv_samples(tsv_url: str, suite: str, metric: str) -> Iterator[dict]:
    for row in _read_tsv(tsv_url):
        category = row.get("category") or ""
        yield make_sample(
            id=row["index"], suite=suite, image=base64.b64decode(row["image"]) if row.get("image") else None,
            question=row["question"], answers=_answer_list(row.get("answer") or ""), metric=metric,
            category=category, source="HME100k" if category == OCRBENCH_FORMULA_TYPE else row.get("source") or "",
        )


# OCRBench's formula questions all come from HME100k; VLMEvalKit's TSV keeps only their type.
OCRBENCH_FORMULA_TYPE = "Handwritten Mathematical Expression Recognition"


def _answer_list(cell: str) -> list[str]:
    text = cell.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return [text]
        return [str(a) for a in parsed]
    return [text] if text else []


def _present(value) -> bool:
    # pandas writes missing cells as empty strings or "nan" depending on who produced the TSV
    return value is not None and str(value).strip() not in ("", "nan", "NaN", "None")


# -- AI2D, original release --------------------------------------------------------------------------------------

def import_ai2d(root: str, suite: str = "ai2d", test_ids_url: str | None = None) -> Iterator[dict]:
    """`<root>/questions/<image>.json` = {imageName, questions: {text: {answerTexts, correctAnswer, questionId,
    abcLabel}}} with images in `<root>/images/`. `test_ids_url` (ai2d_test_ids.csv: one image id a line)
    restricts to the test split the papers report."""
    keep = None
    if test_ids_url:
        keep = {line.strip() for line in storage.read_text(test_ids_url).splitlines() if line.strip()}
    fs, base = storage.filesystem(_join(root, "questions"))
    for path in sorted(fs.glob(base + "/*.json")):
        with fs.open(path, "r") as f:
            doc = json.load(f)
        image_name = doc["imageName"]
        if keep is not None and image_name.split(".")[0] not in keep:
            continue
        image = _read_bytes(_join(_join(root, "images"), image_name))
        for text, q in sorted(doc["questions"].items(), key=lambda kv: kv[1]["questionId"]):
            options = [str(t) for t in q["answerTexts"]]
            yield make_sample(
                id=q["questionId"], suite=suite, image=image, question=text, options=options,
                answers=[LETTERS[int(q["correctAnswer"])]], metric="mc",
                category="abc-label" if q.get("abcLabel") else "no-label",
            )


# -- OCRBench -------------------------------------------------------------------------------------------------

def import_ocrbench(json_url: str, image_root: str | None = None, suite: str = "ocrbench") -> Iterator[dict]:
    """`OCRBench.json`: `[{image_path, question, answers (str or list), dataset_name, type}]`.

    Image paths are relative to `image_root` (the OCRBench_Images folder), default the json's folder.
    """
    root = image_root or _parent(json_url)
    for i, item in enumerate(_read_json(json_url)):
        answers = item["answers"] if isinstance(item["answers"], list) else [item["answers"]]
        yield make_sample(
            id=str(item.get("id", i)), suite=suite, image=_read_bytes(_join(root, item["image_path"])),
            question=item["question"], answers=[str(a) for a in answers], metric="ocrbench",
            category=item.get("type", ""), source=item.get("dataset_name", ""),
        )


# -- Video-MME ------------------------------------------------------------------------------------------------

def import_videomme(parquet_url: str, video_root: str, suite: str = "videomme",
                    video_ext: str = ".mp4") -> Iterator[dict]:
    """`videomme/test-*.parquet`: rows of videoID, question_id, duration (short/medium/long), domain, task_type,
    question, options (["A. …", …]) and answer (a letter); videos are `<video_root>/<videoID>.mp4`.

    Videos are referenced, not copied: frames are sampled from them at evaluation time, at each frame count.
    """
    import pyarrow.parquet as pq

    with storage.open_url(parquet_url, "rb") as f:
        rows = pq.read_table(f).to_pylist()
    for row in rows:
        options = [_strip_letter(o) for o in row["options"]]
        yield make_sample(
            id=str(row["question_id"]), suite=suite, video=_join(video_root, row["videoID"] + video_ext),
            question=row["question"], options=options, answers=[row["answer"].strip()], metric="mc",
            category=row.get("duration") or "", source=row.get("task_type") or "",
        )


def _strip_letter(option: str) -> str:
    # "A. Three." -> "Three."; the runner puts its own letters back
    head, sep, rest = option.partition(". ")
    return rest if sep and len(head) == 1 and head in LETTERS else option


# -- LongVideoBench -------------------------------------------------------------------------------------------

def import_longvideobench(json_url: str, video_root: str | None = None, suite: str = "longvideobench") -> Iterator[dict]:
    """`lvb_val.json`: `[{id, video_path, question, candidates, correct_choice, duration_group, question_category}]`
    with videos in `<video_root>` (default: `videos/` beside the json)."""
    root = video_root or _join(_parent(json_url), "videos")
    for item in _read_json(json_url):
        candidates = [str(c) for c in item["candidates"]]
        correct = item.get("correct_choice")
        yield make_sample(
            id=str(item["id"]), suite=suite, video=_join(root, item["video_path"]), question=item["question"],
            options=candidates, answers=[LETTERS[int(correct)]] if correct is not None else [], metric="mc",
            category=str(item.get("duration_group", "")), source=item.get("question_category", ""),
        )


IMPORTERS: dict[str, Callable[..., Iterator[dict]]] = {
    "docvqa": import_docvqa,
    "textvqa": import_textvqa,
    "chartqa": import_chartqa,
    "mmbench": import_mc_tsv,
    "mc_tsv": import_mc_tsv,
    "vqa_tsv": import_vqa_tsv,
    "ai2d": import_ai2d,
    "ocrbench": import_ocrbench,
    "videomme": import_videomme,
    "longvideobench": import_longvideobench,
}


# -- file access -----------------------------------------------------------------------------------------------

def _join(root: str, relative: str) -> str:
    return root.rstrip("/") + "/" + relative.lstrip("/")


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _read_json(url: str):
    return json.loads(storage.read_bytes(url))


def _read_bytes(url: str) -> bytes:
    return storage.read_bytes(url)


def _read_tsv(url: str) -> Iterator[dict]:
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default field limit
    with storage.open_url(url, "rb") as f:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        for row in csv.DictReader(text, delimiter="\t"):
            yield {k: (v if v is not None else "") for k, v in row.items()}
