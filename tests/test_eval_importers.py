"""Each importer on a small synthetic file in the benchmark's published layout."""

import base64
import csv
import io
import json

import pytest
from PIL import Image

from pipeline.eval.dataset import SCHEMA, decode_image, read_samples
from pipeline.eval.importers import import_benchmark


def _png(color, size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _save(path, color, size=(32, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _roundtrip(layout, src, tmp_path, **options):
    out = str(tmp_path / f"{layout}.arrow")
    count = import_benchmark(layout, str(src), out, **options)
    samples = list(read_samples(out))
    assert count == len(samples)
    assert all(set(s) == set(SCHEMA.names) for s in samples)
    return samples


def test_docvqa(tmp_path):
    _save(tmp_path / "val/documents/pybv0228_81.png", "white", (40, 60))
    (tmp_path / "val/val_v1.0.json").write_text(json.dumps({
        "dataset_name": "docvqa", "dataset_split": "val",
        "data": [{"questionId": 49153, "question": "What is the ratio?", "question_types": ["figure/diagram"],
                  "image": "documents/pybv0228_81.png", "docId": 14465, "ucsf_document_id": "pybv0228",
                  "ucsf_document_page_no": "81", "answers": ["0.28", "0.28 ratio"], "data_split": "val"}]}))
    [s] = _roundtrip("docvqa", tmp_path / "val/val_v1.0.json", tmp_path)
    assert s["id"] == "49153" and s["suite"] == "docvqa" and s["metric"] == "anls"
    assert s["answers"] == ["0.28", "0.28 ratio"] and s["category"] == "figure/diagram"
    assert decode_image(s["image"]).size == (40, 60)


def test_textvqa(tmp_path):
    _save(tmp_path / "train_images/0054c91397f2fe05.jpg", "red")
    answers = ["nokia"] * 7 + ["nokia phone", "nokia", "toshiba"]
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({
        "dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
        "data": [{"question": "what brand is this?", "image_id": "0054c91397f2fe05", "image_classes": ["Phone"],
                  "image_width": 32, "image_height": 24, "answers": answers, "question_tokens": ["what"],
                  "question_id": 34602, "set_name": "val"}]}))
    [s] = _roundtrip("textvqa", tmp_path / "TextVQA_0.5.1_val.json", tmp_path,
                     image_root=str(tmp_path / "train_images"))
    assert s["id"] == "34602" and s["metric"] == "vqa" and s["answers"] == answers
    assert s["question"] == "what brand is this?" and s["options"] == []
    assert decode_image(s["image"]).getpixel((0, 0))[0] > 200  # JPEG: red, roughly


def test_chartqa_human_and_augmented(tmp_path):
    _save(tmp_path / "test/png/41699051005347.png", "blue")
    _save(tmp_path / "test/png/two_col_100.png", "green")
    (tmp_path / "test/test_human.json").write_text(json.dumps(
        [{"imgname": "41699051005347.png", "query": "What is the peak value?", "label": "45%"}]))
    (tmp_path / "test/test_augmented.json").write_text(json.dumps(
        [{"imgname": "two_col_100.png", "query": "Which year is lowest?", "label": 2014}]))
    [h] = _roundtrip("chartqa", tmp_path / "test/test_human.json", tmp_path)
    [a] = _roundtrip("chartqa", tmp_path / "test/test_augmented.json", tmp_path)
    assert (h["id"], h["source"], h["answers"], h["metric"]) == ("human/0", "human", ["45%"], "relaxed")
    assert (a["id"], a["source"], a["answers"]) == ("augmented/0", "augmented", ["2014"])
    assert decode_image(a["image"]).getpixel((0, 0)) == (0, 128, 0)
    both = _roundtrip("chartqa", tmp_path / "test", tmp_path)  # the split folder: human, then augmented
    assert [s["id"] for s in both] == ["human/0", "augmented/0"]


def _write_mmbench_tsv(path):
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
               "l2-category", "comment", "split"]
    rows = [
        [0, "What colour is the square?", "Look closely.", "red", "green", "blue", "yellow", "C",
         "attribute_recognition", base64.b64encode(_png("blue")).decode(), "synthetic", "FP-S", "", "dev"],
        [1, "Is it a square?", "", "yes", "no", "", "", "A", "spatial", "0", "synthetic", "FP-C", "", "dev"],
    ]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(columns)
        writer.writerows(rows)


def test_mmbench_tsv(tmp_path):
    _write_mmbench_tsv(tmp_path / "MMBench_DEV_EN.tsv")
    first, second = _roundtrip("mmbench", tmp_path / "MMBench_DEV_EN.tsv", tmp_path)
    assert first["options"] == ["red", "green", "blue", "yellow"] and first["answers"] == ["C"]
    assert first["hint"] == "Look closely." and first["category"] == "attribute_recognition"
    assert second["options"] == ["yes", "no"] and second["hint"] == ""
    assert second["image"] == first["image"]  # "0" refers to row 0's image
    assert decode_image(second["image"]).getpixel((0, 0)) == (0, 0, 255)


def test_mmbench_circular_rotates_options_and_answer(tmp_path):
    _write_mmbench_tsv(tmp_path / "MMBench_DEV_EN.tsv")
    samples = _roundtrip("mmbench", tmp_path / "MMBench_DEV_EN.tsv", tmp_path, circular=True)
    assert [s["id"] for s in samples] == ["0", "0@1", "0@2", "0@3", "1", "1@1"]
    assert {s["group"] for s in samples[:4]} == {"0"}
    for s in samples[:4]:  # the correct option is always "blue", whatever its letter
        assert s["options"]["ABCD".index(s["answers"][0])] == "blue"
    assert samples[1]["options"] == ["green", "blue", "yellow", "red"] and samples[1]["answers"] == ["B"]
    assert samples[5]["options"] == ["no", "yes"] and samples[5]["answers"] == ["B"]


def test_ai2d_original_layout_with_test_ids(tmp_path):
    for image_id, color in (("0", "red"), ("1", "green")):
        _save(tmp_path / f"ai2d/images/{image_id}.png", color)
        (tmp_path / "ai2d/questions").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"ai2d/questions/{image_id}.png.json").write_text(json.dumps({
            "imageName": f"{image_id}.png",
            "questions": {
                "Which stage comes after the egg?": {"abcLabel": False, "answerTexts": ["larva", "adult", "pupa", "egg"],
                                                     "correctAnswer": 0, "questionId": f"{image_id}.png-0"},
                "Which label shows the sun?": {"abcLabel": True, "answerTexts": ["A", "B", "C", "D"],
                                               "correctAnswer": 3, "questionId": f"{image_id}.png-1"},
            }}))
    (tmp_path / "ai2d_test_ids.csv").write_text("1\n")
    samples = _roundtrip("ai2d", tmp_path / "ai2d", tmp_path, test_ids_url=str(tmp_path / "ai2d_test_ids.csv"))
    assert [s["id"] for s in samples] == ["1.png-0", "1.png-1"]
    assert samples[0]["options"] == ["larva", "adult", "pupa", "egg"] and samples[0]["answers"] == ["A"]
    assert samples[1]["answers"] == ["D"] and samples[1]["category"] == "abc-label"
    assert decode_image(samples[0]["image"]).getpixel((0, 0)) == (0, 128, 0)


def test_ai2d_vlmevalkit_tsv(tmp_path):
    _write_mmbench_tsv(tmp_path / "AI2D_TEST.tsv")
    samples = _roundtrip("mc_tsv", tmp_path / "AI2D_TEST.tsv", tmp_path, suite="ai2d")
    assert [s["suite"] for s in samples] == ["ai2d", "ai2d"]


def test_vlmevalkit_open_answer_tsv(tmp_path):
    image = base64.b64encode(_png("red")).decode()
    with open(tmp_path / "OCRBench.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "image", "question", "answer", "category"])
        writer.writerow([0, image, "what is written in the image?", "['Spar', 'SPAR']", "Regular Text Recognition"])
        writer.writerow([1, image, "Write the formula in LaTeX.", "x ^ { 2 }",
                         "Handwritten Mathematical Expression Recognition"])
    first, second = _roundtrip("vqa_tsv", tmp_path / "OCRBench.tsv", tmp_path, suite="ocrbench", metric="ocrbench")
    assert first["answers"] == ["Spar", "SPAR"] and first["source"] == ""
    assert second["answers"] == ["x ^ { 2 }"] and second["source"] == "HME100k"  # gets the formula rule
    assert decode_image(first["image"]).getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(ValueError, match="unknown metric"):
        import_benchmark("vqa_tsv", str(tmp_path / "OCRBench.tsv"), str(tmp_path / "x.arrow"), suite="x", metric="bleu")
    assert not (tmp_path / "x.arrow").exists()


def test_ocrbench(tmp_path):
    _save(tmp_path / "OCRBench_Images/IIIT5K/1.png", "white")
    _save(tmp_path / "OCRBench_Images/HME100k/2.jpg", "black")
    (tmp_path / "OCRBench/OCRBench.json").parent.mkdir()
    (tmp_path / "OCRBench/OCRBench.json").write_text(json.dumps([
        {"dataset_name": "IIIT5K", "id": 0, "image_path": "IIIT5K/1.png", "question": "what is written in the image?",
         "answers": ["Spar"], "type": "Regular Text Recognition"},
        {"dataset_name": "HME100k", "id": 1, "image_path": "HME100k/2.jpg",
         "question": "Please write out the expression of the formula in the image using LaTeX format.",
         "answers": "x ^ { 2 }", "type": "Handwritten Mathematical Expression Recognition"},
    ]))
    first, second = _roundtrip("ocrbench", tmp_path / "OCRBench/OCRBench.json", tmp_path,
                               image_root=str(tmp_path / "OCRBench_Images"))
    assert (first["answers"], first["source"], first["metric"]) == (["Spar"], "IIIT5K", "ocrbench")
    assert second["answers"] == ["x ^ { 2 }"]  # a bare string becomes a one-answer list
    assert second["category"] == "Handwritten Mathematical Expression Recognition"


def test_a_failed_import_leaves_no_truncated_file(tmp_path):
    _save(tmp_path / "test/png/a.png", "red")
    rows = [{"imgname": "a.png", "query": "q", "label": "1"}] * 300 + [{"imgname": "missing.png", "query": "q", "label": "1"}]
    (tmp_path / "test/test_human.json").write_text(json.dumps(rows))  # the bad row comes after a full batch
    with pytest.raises(FileNotFoundError):
        import_benchmark("chartqa", str(tmp_path / "test/test_human.json"), str(tmp_path / "out.arrow"))
    assert not (tmp_path / "out.arrow").exists()


def test_unknown_layout(tmp_path):
    with pytest.raises(ValueError, match="unknown layout"):
        import_benchmark("mmmu", "x", str(tmp_path / "x.arrow"))
