"""Train the small Qwen2.5-VL teacher of the transfer proof on its own (the teacher stage's `teacher.train`).

The training itself is pipeline/teacher_train.py (the teacher stage runs it inside a pipeline run); this
runs it outside one, to try settings: it writes the teacher and processor in Hugging Face format to
`<out>/teacher/` (usable as `teacher.source`) and a JSON report to `<out>/report.json`.

    python -m bench.proof_teacher --out /tmp/proof [--steps N] [--hidden H] [--layers L] [--set field=value]

The defaults fit a few CPU minutes; configs/proof.yaml's `teacher.train` is the GPU setting.
"""

from __future__ import annotations

import argparse
import json
import os

import yaml

from pipeline.config import TeacherTrainSection
from pipeline.teacher_train import train_teacher


def run(args: argparse.Namespace) -> dict:
    fields = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "hidden": args.hidden,
              "num_layers": args.layers, "vision_hidden": args.vision_hidden, "vision_depth": args.vision_depth,
              "eval_pictures": args.eval_pictures}
    for item in args.set:
        key, _, value = item.partition("=")
        fields[key] = yaml.safe_load(value)
    settings = TeacherTrainSection(**fields)
    model, processor, metrics = train_teacher(settings, seed=args.seed)
    teacher_dir = os.path.join(args.out, "teacher")
    model.save_pretrained(teacher_dir)
    processor.save_pretrained(teacher_dir)
    report = {"config": settings.model_dump(mode="json"), "seed": args.seed, **metrics, "teacher_dir": teacher_dir}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"teacher saved to {teacher_dir}; report in {os.path.join(args.out, 'report.json')}")
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
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
