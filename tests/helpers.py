"""Small helpers shared by the test modules."""

import os

import numpy as np
import torch
from PIL import Image


def random_image(seed: int, h: int = 90, w: int = 120) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def lively_tiny_teacher(weight_seed: int = 0):
    """The tiny teacher with weights drawn wide enough that its greedy output depends on the input.

    At the default initialisation every prompt decodes to the same token run, which would let batching
    bugs (padding side, image order, a misordered merge of ranks) go unnoticed.
    """
    from model.tiny import build_tiny_teacher

    model, processor = build_tiny_teacher(seed=0)
    torch.manual_seed(weight_seed)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0.0, 0.2)
    return model, processor


def fake_recipe(name: str, body, version: int = 1, inputs: tuple[str, ...] = (), sections=None):
    """A stand-in for a recipe module of pipeline.recipes: `body(ctx)` does the work; its outputs are every file
    it wrote into its attempt folder (their digest is the stage's output digest)."""
    from types import SimpleNamespace

    from pipeline import storage
    from pipeline.recipes import RECIPES

    return SimpleNamespace(NAME=name, SECTIONS=RECIPES[name].SECTIONS if sections is None else sections,
                           VERSION=version, inputs=lambda config: inputs, run=body,
                           outputs=storage.remote_file_digests, check=lambda config: [])


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), from Linux's /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie is dead, only not yet reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
