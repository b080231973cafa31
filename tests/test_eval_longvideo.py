"""The long-video needle task: the videos it draws and the per-frame-count run with its plot."""

import json

from PIL import Image

from pipeline.eval.longvideo import LongVideoConfig, needle_sample, run_longvideo
from pipeline.eval.synthetic import COLORS


def _is_grey(image):
    return all(r == g == b for r, g, b in image.getdata())


def test_needle_shows_the_answer_object_only_during_its_frames():
    config = LongVideoConfig(frame_size=56, needle_frames=4, seed=1)
    sample = needle_sample(32, 5, config)
    start = int(sample["source"].rsplit(" ", 1)[1])
    colour, _ = sample["options"]["ABCD".index(sample["answers"][0])].split()
    frames = sample["frames"]
    assert len(frames) == 32 and frames[0].size == (56, 56)
    for t, frame in enumerate(frames):
        shown = start <= t < start + 4
        assert _is_grey(frame) != shown
        if shown:
            assert COLORS[colour] in set(frame.getdata())
    assert len(set(sample["options"])) == 4


def test_needle_videos_are_deterministic_and_vary_with_index():
    config = LongVideoConfig()
    a, b, c = needle_sample(16, 0, config), needle_sample(16, 0, config), needle_sample(16, 1, config)
    assert [f.tobytes() for f in a["frames"]] == [f.tobytes() for f in b["frames"]]
    assert a["options"] == b["options"] and a["source"] == b["source"]
    assert [f.tobytes() for f in a["frames"]] != [f.tobytes() for f in c["frames"]]


def test_run_longvideo_scores_each_frame_count_and_plots(tiny_teacher, tmp_path):
    model, processor = tiny_teacher
    config = LongVideoConfig(frame_counts=[4, 16], samples_per_count=3)
    results = run_longvideo(model, processor, str(tmp_path), config, {"batch_size": 2, "max_new_tokens": 3}, "tiny")
    assert [r["frames"] for r in results["rows"]] == [4, 16]
    assert all(r["n"] == 3 for r in results["rows"])
    for row in results["rows"]:
        suite = json.loads((tmp_path / "longvideo" / f"frames_{row['frames']}" / "results.json").read_text())
        assert suite["score"] == row["score"] and suite["config"]["video_frames"] == row["frames"]
    assert json.loads((tmp_path / "longvideo" / "results.json").read_text()) == results
    with Image.open(tmp_path / "longvideo" / "longvideo.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 300
