"""Long-video understanding as the number of frames grows: the paper's length-generalisation figure.

The task is a needle in a video: among frames of grey distractor shapes drifting over a grey background,
one coloured object shows for a few consecutive frames at a random moment; the question asks which
object appeared (four options). Videos are drawn deterministically from (seed, frame count, index), so
every checkpoint sees the same ones. Each frame count is scored as its own suite and the scores are
plotted against the number of frames. Imported video benchmarks (Video-MME, LongVideoBench) are swept
the same way, sampling each video file at every frame count.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable

from PIL import Image, ImageDraw

from pipeline import storage

from .dataset import read_samples
from .metrics import LETTERS
from .runner import EvalConfig, is_main_process, run_suite
from .synthetic import COLORS, SHAPES, draw_shape

QUESTION = "A coloured object appears for a moment in this video. Which object is it?"
CHANCE = 100.0 / 4


@dataclass
class LongVideoConfig:
    frame_counts: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512, 1024])
    samples_per_count: int = 8
    frame_size: int = 56       # pixels a side; tiny frames keep a CPU run to minutes
    needle_frames: int = 4     # consecutive frames showing the object (two temporal patches)
    fps: float = 2.0
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict | "LongVideoConfig" | None) -> "LongVideoConfig":
        if values is None or isinstance(values, cls):
            return values or cls()
        return cls(**values)


def needle_sample(n_frames: int, index: int, config: LongVideoConfig) -> dict:
    rng = random.Random(f"needle/{config.seed}/{n_frames}/{index}")
    colour, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    start = rng.randint(0, max(0, n_frames - config.needle_frames))
    distractors = _drifting_grey_shapes(rng, config.frame_size)
    frames = []
    for t in range(n_frames):
        image = Image.new("RGB", (config.frame_size, config.frame_size), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        for d in distractors:
            d.draw(draw, t, config.frame_size)
        if start <= t < start + config.needle_frames:
            s = config.frame_size
            draw_shape(draw, shape, (s // 4, s // 4, 3 * s // 4, 3 * s // 4), COLORS[colour])
        frames.append(image)
    options = _options(rng, colour, shape)
    return {
        "id": f"{n_frames}/{index}", "suite": "longvideo", "image": None, "video": "", "frames": frames,
        "video_fps": config.fps, "question": QUESTION,
        "hint": "", "options": options, "answers": [LETTERS[options.index(f"{colour} {shape}")]], "metric": "mc",
        "category": str(n_frames), "source": f"needle at frame {start}", "group": "",
    }


def _options(rng: random.Random, colour: str, shape: str) -> list[str]:
    # Distractors share the colour or the shape, so naming just one of them is not enough.
    same_shape = [f"{c} {shape}" for c in sorted(COLORS) if c != colour]
    same_colour = [f"{colour} {s}" for s in SHAPES if s != shape]
    distractors = rng.sample(same_shape, 2) + rng.sample(same_colour, 1)
    options = [f"{colour} {shape}"] + distractors
    rng.shuffle(options)
    return options


@dataclass
class _Drifter:
    shape: str
    grey: int
    x: float
    y: float
    dx: float
    dy: float

    def draw(self, draw: ImageDraw.ImageDraw, t: int, size: int) -> None:
        r = size // 8
        x = int(self.x + self.dx * t) % (size - 2 * r)
        y = int(self.y + self.dy * t) % (size - 2 * r)
        draw_shape(draw, self.shape, (x, y, x + 2 * r, y + 2 * r), (self.grey,) * 3)


def _drifting_grey_shapes(rng: random.Random, size: int, count: int = 3) -> list[_Drifter]:
    return [_Drifter(rng.choice(SHAPES), rng.choice([60, 90, 170, 200]), rng.uniform(0, size), rng.uniform(0, size),
                     rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5)) for _ in range(count)]


def run_longvideo(model, processor, out_dir: str, config: LongVideoConfig | dict | None = None,
                  eval_config: EvalConfig | dict | None = None, model_name: str = "") -> dict:
    """Scores the needle task at every frame count; writes results.json and longvideo.png."""
    config = LongVideoConfig.from_dict(config)

    def samples_at(n_frames: int):
        return (needle_sample(n_frames, i, config) for i in range(config.samples_per_count))

    return sweep_frames(model, processor, "longvideo", samples_at, config.frame_counts, out_dir, eval_config,
                        model_name, title="Long-video needle task", chance=CHANCE, extra={"config": asdict(config)})


def run_video_benchmark(model, processor, name: str, samples_url: str, frame_counts: list[int], out_dir: str,
                        eval_config: EvalConfig | dict | None = None, model_name: str = "") -> dict:
    """An imported video benchmark (Video-MME, LongVideoBench) with each video sampled at every frame count."""
    return sweep_frames(model, processor, name, lambda n: read_samples(samples_url), frame_counts, out_dir,
                        eval_config, model_name, title=name)


def sweep_frames(model, processor, name: str, samples_at: Callable[[int], Iterable[dict]], frame_counts: list[int],
                 out_dir: str, eval_config: EvalConfig | dict | None = None, model_name: str = "", title: str = "",
                 chance: float | None = None, extra: dict | None = None) -> dict:
    """Runs `samples_at(n)` as suite `frames_<n>` for each n; writes `<name>/results.json` and `<name>.png`."""
    eval_config = EvalConfig.from_dict(eval_config)
    root = f"{out_dir.rstrip('/')}/{name}"
    rows = []
    for n_frames in frame_counts:
        at_n = replace(eval_config, video_frames=n_frames)
        suite = run_suite(model, processor, samples_at(n_frames), f"frames_{n_frames}", root, at_n, model_name)
        rows.append({"frames": n_frames, "n": suite["n"], "score": suite["score"]})
    results = {
        "suite": name, "model": model_name, "rows": rows,
        "score_by_frames": {str(r["frames"]): r["score"] for r in rows},
        **(extra or {}), "eval_config": asdict(eval_config), "plot": f"{root}/{name}.png",
    }
    if is_main_process():
        _save_plot(rows, model_name, results["plot"], title or name, chance)
        storage.write_text(f"{root}/results.json", json.dumps(results, indent=2))
    return results


def _save_plot(rows: list[dict], model_name: str, url: str, title: str, chance: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["frames"] for r in rows], [r["score"] for r in rows], marker="o", label=model_name or "model")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["frames"] for r in rows], [str(r["frames"]) for r in rows])
    ax.set_ylim(0, 100)
    ax.set_xlabel("frames")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(loc="lower left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(url, buf.getvalue())
