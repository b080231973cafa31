"""Train the small Qwen2.5-VL teacher of the transfer proof on its own (the teacher stage's `teacher.train`).

The training itself is pipeline/teacher_train.py (the teacher stage runs it inside a pipeline run); this
runs it outside one, to try settings: it writes the teacher and processor in Hugging Face format to
`<out>/teacher/` (usable as `teacher.source`) and a JSON report to `<out>/report.json`.

    python -m bench.proof_teacher --out /tmp/proof [--steps N] [--hidden H] [--layers L] [--set field=value]
    python -m bench.proof_teacher --out OUT --config configs/mechanisms.yaml --profile-step
    python -m bench.proof_teacher --out OUT --config configs/mechanisms.yaml --set pictures=[dense_text] --mechanisms

The defaults fit a few CPU minutes; configs/proof.yaml's `teacher.train` is the GPU setting. `--config` takes a run
config's `teacher.train` (and family) instead, `--set` still overriding it. `--profile-step` trains nothing: it draws
one training batch as the teacher stage does, times making it, and profiles the teacher's forward and backward on it
(the device's kernels on a GPU: how busy the device is, and on what), writing `<out>/profile.json`. `--mechanisms`
scores the trained teacher on bench/mechanisms.py's sweeps (report key `mechanisms`): whether a teacher setting
learns both tasks, tried alone.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import yaml

from bench.common import provenance
from pipeline.config import TeacherTrainSection, dense_text_caps_too_small, load_config
from pipeline.teacher_train import train_teacher


def run(args: argparse.Namespace) -> dict:
    family = "qwen2_5_vl"
    if args.config:
        teacher = load_config(args.config).teacher
        fields, family = teacher.train.model_dump(), teacher.family
    else:
        fields = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "hidden": args.hidden,
                  "num_layers": args.layers, "vision_hidden": args.vision_hidden, "vision_depth": args.vision_depth,
                  "eval_pictures": args.eval_pictures}
    for item in args.set:
        key, _, value = item.partition("=")
        fields[key] = yaml.safe_load(value)
    settings = TeacherTrainSection(**fields)
    if "dense_text" in (settings.pictures or ()):
        problem = dense_text_caps_too_small([("teacher.train", settings.max_pixels)])
        if problem:
            raise SystemExit(f"proof_teacher: {problem}")
    os.makedirs(args.out, exist_ok=True)
    if args.profile_step:
        return profile_step(settings, args.seed, family, args.out)
    model, processor, metrics = train_teacher(settings, seed=args.seed, family=family)
    teacher_dir = os.path.join(args.out, "teacher")
    model.save_pretrained(teacher_dir)
    processor.save_pretrained(teacher_dir)
    report = {**provenance(), "config": settings.model_dump(mode="json"), "seed": args.seed, **metrics,
              "teacher_dir": teacher_dir}
    if args.mechanisms is not None:
        report["mechanisms"] = score_mechanisms_sweep(teacher_dir, args.mechanisms,
                                                      os.path.join(args.out, "mechanisms"))
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"teacher saved to {teacher_dir}; report in {os.path.join(args.out, 'report.json')}")
    return report


def score_mechanisms_sweep(teacher_dir: str, sweep_json: str, out_dir: str) -> dict:
    """The saved teacher scored as bench/mechanisms.py scores every arm (recall against distance and frame count,
    dense text exact and by character), on the sweep `sweep_json` overrides: a teacher setting tried alone says
    whether the teacher learns both tasks before a whole mechanisms run is spent on it."""
    from pipeline.eval.api import load_checkpoint
    from pipeline.eval.mechanisms import MechanismsConfig, score_mechanisms

    sweep = MechanismsConfig.from_dict(json.loads(sweep_json or "{}"))
    model, processor = load_checkpoint(teacher_dir)
    scores = score_mechanisms(model, processor, out_dir, sweep)
    print("mechanisms: recall by distance "
          + ", ".join(f"{r['tokens']} tokens {r['accuracy']:.0f}%" for r in scores["recall_by_distance"])
          + f"; text exact {scores['text']['exact']:.1f}%, characters {scores['text']['char_accuracy']:.1f}%; frames "
          + ", ".join(f"{r['frames']} {r['accuracy']:.0f}%" for r in scores["frames"]))
    return scores


def profile_step(settings: TeacherTrainSection, seed: int, family: str, out: str, calls: int = 3) -> dict:
    """One training batch as the teacher stage's loader draws its first, what it holds and how long it took to make,
    and the kernel profile of the teacher's forward and backward on it."""
    from bench.profiling import kernel_profile, show_profile
    from pipeline.teacher_train import PictureBatches, build_teacher, forward_backward, to_device

    model, processor, device, autocast = build_teacher(settings, seed, family)
    started = time.perf_counter()
    batch = next(iter(PictureBatches(processor, settings.batch_size, seed, kinds=settings.pictures,
                                     max_frames=settings.max_frames)))
    made_s = time.perf_counter() - started
    lengths = batch["attention_mask"].sum(1)
    shape = {"rows": int(lengths.numel()), "longest": int(lengths.max()), "tokens": int(lengths.sum()),
             "padding_share": round(1 - float(lengths.sum()) / batch["attention_mask"].numel(), 3),
             "image_patches": int(batch["pixel_values"].shape[0]) if "pixel_values" in batch else 0,
             "video_patches": int(batch["pixel_values_videos"].shape[0]) if "pixel_values_videos" in batch else 0,
             "seconds_to_make": round(made_s, 3)}
    batch = to_device(batch, device)

    def step():
        model.zero_grad(set_to_none=True)
        forward_backward(model, batch, autocast)

    profile = kernel_profile(step, calls=calls, cuda=device.type == "cuda", top=20)
    print("batch:", "  ".join(f"{k} {v}" for k, v in shape.items()))
    show_profile(f"teacher forward and backward ({family}, {device})", profile)
    report = {**provenance(), "config": settings.model_dump(mode="json"), "family": family, "seed": seed,
              "torch_device": str(device), "batch": shape, "profile": profile}
    path = os.path.join(out, "profile.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for teacher/ and report.json")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vision-hidden", type=int, default=64)
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--eval-pictures", type=int, default=64, help="held-out pictures scored (two questions each)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other teacher.train field (precision, target_accuracy, device, loader_workers, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None, help="a run config whose teacher.train (and family) to use")
    p.add_argument("--mechanisms", nargs="?", const="{}", default=None, metavar="SWEEP_JSON",
                   help="after training, score the teacher on the mechanisms sweeps (bench/mechanisms.py's scorer; "
                        "the JSON overrides pipeline.eval.mechanisms.MechanismsConfig, e.g. '{\"recall_samples\": 8}')")
    p.add_argument("--profile-step", action="store_true",
                   help="train nothing: profile one training batch's forward and backward (<out>/profile.json)")
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
