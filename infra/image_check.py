"""What an image (or a node's environment) must hold to run every stage, checked in one command:

    python -m infra.image_check [--gpu]

Imports each package the stages use and the project itself, prints their versions, and says which Gated
DeltaNet backward path a Hopper GPU takes (fla's own with Triton >= 3.7.1, or the guarded lift). With `--gpu`,
one Gated DeltaNet forward and backward runs on the GPU through fla against the torch reference. Exits non-zero
naming every missing piece at once.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import sys

# (import name, distribution) of everything a stage process imports
REQUIRED = [("torch", "torch"), ("triton", "triton"), ("transformers", "transformers"), ("peft", "peft"),
            ("fla", "flash-linear-attention"), ("deepspeed", "deepspeed"), ("prefect", "prefect"),
            ("pyarrow", "pyarrow"), ("s3fs", "s3fs"), ("av", "av"), ("pypdfium2", "pypdfium2"),
            ("safetensors", "safetensors"), ("pydantic", "pydantic")]
PROJECT = ["model", "pipeline.plan", "pipeline.train.worker", "pipeline.teacher_logits.store", "pipeline.eval.api",
           "flows.cli", "flows.pipeline"]


def check(gpu: bool = False) -> list[str]:
    problems = []
    for module, dist in REQUIRED:
        try:
            importlib.import_module(module)
            print(f"  {dist:24s} {metadata.version(dist)}")
        except Exception as exc:  # noqa: BLE001 - every missing piece is reported, not the first
            problems.append(f"{dist}: cannot import {module} ({type(exc).__name__}: {exc})")
    for module in PROJECT:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"the project's {module} does not import ({type(exc).__name__}: {exc})")
    if not problems:
        print(f"  Gated DeltaNet backward on Hopper: {hopper_path()}")
    if gpu and not problems:
        problems += gpu_problems()
    return problems


def hopper_path() -> str:
    from fla.utils import TRITON_ABOVE_3_7_1

    if TRITON_ABOVE_3_7_1:
        return "fla's kernels as they are (Triton >= 3.7.1)"
    return ("fla's guard lifted after a gradient check on the GPU (Triton < 3.7.1; INFINITEVL_LIFT_FLA_HOPPER_GUARD="
            "1 is needed, and the image sets it)")


def gpu_problems() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return ["--gpu: no CUDA device is visible"]
    from model.ops.common import ensure_fla_backward_ok
    from model.ops.delta_rule import fla_check

    ensure_fla_backward_ok(torch.device("cuda"), "gated_delta_rule", fla_check)  # the guard, as a stage meets it
    errors = fla_check(torch.device("cuda"), 64)
    print(f"  fla Gated DeltaNet (bf16) vs the fp32 torch reference on {torch.cuda.get_device_name()}: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    return [f"fla's Gated DeltaNet {k} differs from the reference (rel. error {v:.2e})"
            for k, v in errors.items() if v > 2e-2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m infra.image_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="also run a Gated DeltaNet forward/backward on the GPU")
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}")
    problems = check(args.gpu)
    if problems:
        print("missing:\n" + "\n".join(f"  {p}" for p in problems), file=sys.stderr)
        raise SystemExit(1)
    print("image check: everything the stages need is here")


if __name__ == "__main__":
    main()
