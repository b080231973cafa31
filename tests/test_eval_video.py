"""Video benchmarks: Video-MME and LongVideoBench layouts, even frame sampling, the frame-count sweep."""

import json

import numpy as np
from PIL import Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.eval.api import evaluate_model
from pipeline.eval.dataset import read_samples
from pipeline.eval.importers import import_benchmark
from pipeline.eval.runner import EvalConfig, video_frames
from pipeline.data.synthetic import write_video


def _write_video(path, n_frames=20, fps=10, size=32):
    """Frame i is a flat grey of level 10 * i, so a decoded frame tells which one it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = [Image.fromarray(np.full((size, size, 3), 10 * i, np.uint8)) for i in range(n_frames)]
    write_video(path, frames, fps=fps)


@pytest.fixture
def videomme(tmp_path):
    _write_video(tmp_path / "data/fFjv93ACGo8.mp4")
    _write_video(tmp_path / "data/Ak2qzv4TSHs.mp4", n_frames=25)
    table = pa.Table.from_pylist([
        {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
         "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
         "task_type": "Counting Problem", "question": "How many frames are grey?",
         "options": ["A. One.", "B. Two.", "C. All of them.", "D. None."], "answer": "C"},
        {"video_id": "002", "duration": "long", "domain": "Sports", "sub_category": "Football",
         "url": "https://www.youtube.com/watch?v=Ak2qzv4TSHs", "videoID": "Ak2qzv4TSHs", "question_id": "002-3",
         "task_type": "Object Recognition", "question": "What fades in?",
         "options": ["A. White.", "B. Red.", "C. Blue.", "D. Green."], "answer": "A"},
    ])
    (tmp_path / "videomme").mkdir()
    pq.write_table(table, tmp_path / "videomme/test-00000-of-00001.parquet")
    out = str(tmp_path / "videomme.arrow")
    import_benchmark("videomme", str(tmp_path / "videomme/test-00000-of-00001.parquet"), out,
                     video_root=str(tmp_path / "data"))
    return out


def test_videomme_layout(videomme, tmp_path):
    first, second = read_samples(videomme)
    assert first["id"] == "001-1" and first["video"] == str(tmp_path / "data/fFjv93ACGo8.mp4")
    assert first["options"] == ["One.", "Two.", "All of them.", "None."] and first["answers"] == ["C"]
    assert (first["category"], first["source"], first["image"]) == ("short", "Counting Problem", None)
    assert second["category"] == "long" and second["answers"] == ["A"]


def test_longvideobench_layout(tmp_path):
    _write_video(tmp_path / "lvb/videos/86CxyhFV9MI.mp4")
    (tmp_path / "lvb/lvb_val.json").write_text(json.dumps([
        {"video_id": "86CxyhFV9MI", "id": "86CxyhFV9MI_0", "video_path": "86CxyhFV9MI.mp4",
         "question": "What colour is the last frame?", "candidates": ["black", "grey", "white", "red", "blue"],
         "correct_choice": 1, "duration_group": 15, "question_category": "E2O", "duration": 2.0}]))
    out = str(tmp_path / "lvb.arrow")
    import_benchmark("longvideobench", str(tmp_path / "lvb/lvb_val.json"), out)
    [s] = read_samples(out)
    assert s["video"] == str(tmp_path / "lvb/videos/86CxyhFV9MI.mp4")
    assert s["options"] == ["black", "grey", "white", "red", "blue"] and s["answers"] == ["B"]
    assert (s["category"], s["source"]) == ("15", "E2O")


def test_frames_are_sampled_evenly_over_the_whole_video(tmp_path):
    _write_video(tmp_path / "v.mp4", n_frames=20, fps=10)  # 2 seconds
    frames, fps = video_frames({"video": str(tmp_path / "v.mp4")}, EvalConfig(video_frames=5))
    assert len(frames) == 5 and fps == pytest.approx(2.5)  # 5 frames over 2 s
    # frames 0, 4, 8, 12, 16 of the video, whose grey levels are 0, 40, 80, 120, 160 (lossy codec: ±8)
    levels = [np.asarray(f, dtype=float).mean() for f in frames]
    assert levels == pytest.approx([0, 40, 80, 120, 160], abs=8)


def test_video_benchmark_is_scored_at_every_frame_count(tiny_teacher, videomme, tmp_path):
    model, processor = tiny_teacher
    out = str(tmp_path / "report")
    results = evaluate_model(model, processor, [f"videomme={videomme}"], out, {"max_new_tokens": 2},
                             longvideo={"frame_counts": [2, 8]})
    rows = results["videomme"]["rows"]
    assert [(r["frames"], r["n"]) for r in rows] == [(2, 2), (8, 2)]
    for n in (2, 8):
        suite = json.loads((tmp_path / f"report/videomme/frames_{n}/results.json").read_text())
        assert suite["config"]["video_frames"] == n and suite["categories"].keys() == {"long", "short"}
    assert (tmp_path / "report/videomme/videomme.png").exists()
    summary = json.loads((tmp_path / "report/summary.json").read_text())["scores"]
    assert set(summary) == {"videomme", "videomme/2", "videomme/8", "score"}
