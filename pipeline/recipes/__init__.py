"""The stages of a run, one recipe module each, in pipeline order.

A recipe module declares
    NAME, SECTIONS  the stage's name and the config sections (or fields) its fingerprint covers
    VERSION         its recipe version: bumped when the stage's output changes meaning for the same inputs
    inputs(config)  the stages whose committed outputs it reads
and reads as its steps:
    run(ctx)        does the work into ctx.output (its attempt folder) and returns metrics
    outputs(folder) the files it published, with the sha256 their writers recorded (their digest is the
                    stage's output digest, which its dependents' fingerprints cover)
    check(config)   the problems that can be known before any work starts (missing inputs), one line each
Training stages also have `build(job, dtype, device, log)`, which each worker process calls to get what it trains.
"""

from . import data, stage1a, stage1b, stage2, stage3, teacher, teacher_logits
from . import eval as evaluation

RECIPES = {r.NAME: r for r in (teacher, data, teacher_logits, stage1a, stage1b, stage2, stage3, evaluation)}
