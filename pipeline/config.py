"""The run config: one pydantic model made of one section per stage, loaded from YAML plus overrides.

A config is validated as a whole before anything runs, so a typo in the last stage's section fails the
run in its first second rather than after hours of training. Every section forbids unknown fields;
errors name the dotted field (`train.stage1a.steps: Input should be greater than 0 (got -5)`).

Each stage's fingerprint covers only the sections its recipe names (pipeline/recipes/), so changing the
evaluation settings does not invalidate the training stages.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from . import storage
from .data.config import SourceConfig
from .stages import STAGE_ORDER


class ConfigError(ValueError):
    """A bad run config or override; the message names the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunSection(Section):
    name: str = Field(min_length=1)
    root: str = Field(min_length=1, description="fsspec URL or local path; stage outputs go to <root>/<stage>/")
    stages: list[str] = Field(min_length=1, description="stages to run, in pipeline order")
    seed: int = 0
    lease_ttl_s: float = Field(120.0, gt=0, description="a stage attempt's lease on its output lives this long "
                               "after its last renewal (every ttl/4); a dead attempt frees its stage then")


class TeacherTrainSection(Section):
    """Trains the tiny teacher on the synthetic picture questions (pipeline/teacher_train.py), so that
    the distillation has something real to transfer; scored on the held-out `pictures` suite."""
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("device", "loader_workers", "max_seconds", "checkpoint_seconds")
    steps: int = Field(gt=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine schedule floor, as a fraction of lr")
    hidden: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    heads: int = Field(4, gt=0)
    kv_heads: int = Field(2, gt=0)
    intermediate: int = Field(256, gt=0)
    vision_hidden: int = Field(64, gt=0)
    vision_depth: int = Field(2, gt=0)
    precision: Literal["fp32", "bf16"] = "fp32"
    target_accuracy: float | None = Field(None, gt=0, le=1, description="stop early once validation exact match reaches it")
    eval_pictures: int = Field(64, gt=0, description="held-out pictures scored after training (two questions each)")
    device: str | None = Field(None, description="cuda or cpu; default: cuda when available")
    loader_workers: int = Field(0, ge=0, description="processes drawing and encoding training pictures")
    max_seconds: float | None = Field(None, gt=0, description="stop training after this long, whatever the step "
                                                             "(seconds trained, summed over a killed run's resumes)")
    checkpoint_seconds: float = Field(120.0, ge=0, description="how often the teacher stage saves its training, "
                                                               "so that a killed stage goes on from there")
    pictures: list[Literal["shapes", "bar_chart", "line_chart", "text_line", "recall", "dense_text"]] | None = Field(
        None, min_length=1, description="the kinds of picture the teacher learns, and so the ones the run's "
                                        "sample-pictures corpora and held-out pictures suite use (default: the four "
                                        "sample-data kinds; recall and dense_text are the mechanisms suite's)")
    max_frames: int = Field(64, ge=4, description="the longest frame stream of the `recall` kind (2 tokens a frame)")
    max_pixels: int = Field(28 * 28 * 64, gt=0, description="image size cap of the teacher's processor, saved "
                                                            "with it (28·28·16: at most 16 image tokens)")


class TeacherSection(Section):
    # "tiny" builds the in-code tiny teacher of `family` (model/tiny.py); anything else is a local directory, an
    # fsspec URL or a Hugging Face Hub id of a checkpoint of any supported family (its config.json says which),
    # copied into the run root so a run keeps working when the source moves.
    source: str = Field(min_length=1)
    family: str = Field("qwen2_5_vl", description="the teacher family (model.family_names()) of the in-code tiny "
                                                  "teacher; a checkpoint's family is read from its config.json")
    seed: int = 0
    train: TeacherTrainSection | None = Field(None, description="train the tiny teacher (source: tiny only)")

    @field_validator("family")
    @classmethod
    def _known_family(cls, family: str) -> str:
        # model/families/ is the one list of families (importing model takes seconds: a default is not checked)
        from model import family_names

        if family not in family_names():
            raise ValueError(f"unknown teacher family {family!r}; families: {', '.join(family_names())}")
        return family

    @model_validator(mode="after")
    def _train_only_tiny(self) -> "TeacherSection":
        if self.train is not None and self.source != "tiny":
            raise ValueError(f"teacher.train: only the in-code tiny teacher is trained here (teacher.source is "
                             f"{self.source!r}, not 'tiny')")
        if self.train is not None and self.train.hidden % self.train.heads:
            raise ValueError(f"teacher.train.hidden ({self.train.hidden}) must be a multiple of heads ({self.train.heads})")
        return self


def dense_text_caps_too_small(caps: list[tuple[str, int]]) -> str | None:
    """What is wrong with these (where, max_pixels) processor caps for the dense_text picture, every one named, or
    None: a character a merged token, so a cap under the picture's size shrinks the characters out of their cells."""
    from pipeline.eval.mechanisms import TEXT_PIXELS, TEXT_SIZE

    small = [f"{where}.max_pixels ({cap})" for where, cap in caps if cap < TEXT_PIXELS]
    if not small:
        return None
    return (f"{', '.join(small)} under the dense_text picture's {TEXT_SIZE[0]}x{TEXT_SIZE[1]} = {TEXT_PIXELS}: "
            "the processor would shrink its characters out of their cells")


class StudentSection(Section):
    """The hybrid decoder built from the teacher; names follow model/config.py. Fields left unset take the teacher
    family's defaults: 1 sliding-window layer : 3 linear layers with the teacher's attention dims (Qwen3.5: its own
    layout and its Gated DeltaNet's dims, which its linear layers keep)."""
    sliding_window: int = Field(gt=0)
    layer_period: int | None = Field(None, gt=0, description="one sliding-window layer, then layer_period-1 linear "
                                                             "layers (default: the family's layout)")
    num_linear_heads: int | None = Field(None, gt=0)
    linear_head_dim: int | None = Field(None, gt=0)
    expand_v: float | None = Field(None, gt=0, description="value dim over key dim of the linear layers (default: 2, "
                                                           "or the teacher's own linear layers')")
    conv_size: int | None = Field(None, gt=0, description="short convolution width (default: 4, or the teacher's)")
    linear_mixer: str = Field("gated_deltanet", description="recurrence of the linear layers, one of "
                                                            "model.mixer_names() (gla and mamba2: the paper's ablation)")
    layer_types: list[Literal["sliding_attention", "linear_attention"]] | None = Field(
        None, min_length=1, description="one entry per decoder layer, instead of layer_period's pattern (e.g. every "
                                        "layer linear: the sliding share 0 of the paper's ablation)")

    @field_validator("linear_mixer")
    @classmethod
    def _known_mixer(cls, mixer: str) -> str:
        # model.layers.MIXERS is the one list of mixers (importing model takes seconds: a default is not checked)
        from model import mixer_names

        if mixer not in mixer_names():
            raise ValueError(f"unknown linear mixer {mixer!r}; mixers: {', '.join(mixer_names())}")
        return mixer


class CorpusSection(Section):
    """One corpus of the data stage. A source is a URL (a .json/.jsonl LLaVA annotation file, a Parquet file
    or folder), an entry with options ({path, format, name, media_root, columns, weight, max_samples, fps,
    max_frames, min_pixels, max_pixels}: pipeline/data/config.py SourceConfig), or 'sample' /
    'sample-pictures' for the built-in sample data."""
    sources: list[Annotated[Annotated[str, Tag("url")] | Annotated[SourceConfig, Tag("entry")],
                            Discriminator(lambda v: "url" if isinstance(v, str) else "entry")]] = Field(
        min_length=1, description="source URLs or entries, or 'sample'")
    mix: dict[Literal["distill", "instruct", "long"], float] = Field(
        default_factory=dict, description="other corpora's sources mixed in, as a share of this corpus: "
                                          "{instruct: 0.2} is 4 parts this corpus's sources to 1 part Stage II data")
    max_samples: int | None = Field(None, gt=0)
    seq_len: int = Field(gt=0)
    max_pixels: int = Field(gt=0)

    @field_validator("mix")
    @classmethod
    def _shares(cls, mix: dict[str, float]) -> dict[str, float]:
        if any(not 0 < share < 1 for share in mix.values()) or sum(mix.values()) >= 1:
            raise ValueError(f"shares must lie between 0 and 1 and leave room for the corpus's own sources "
                             f"(got {mix})")
        return mix

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list) -> list:
        names = [SourceConfig(path=s).name if isinstance(s, str) else s.name for s in sources
                 if not isinstance(s, str) or "/" in s or "." in s]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"two sources are named {', '.join(repeated)} (from their paths): give them a `name`")
        return sources


class DataSection(Section):
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("workers",)
    distill: CorpusSection
    instruct: CorpusSection
    long: CorpusSection
    shard_tokens: int = Field(1 << 20, gt=0)
    workers: int = Field(1, gt=0)
    chat_template: str | None = Field(None, description="a chat template file (.jinja, or .json with `chat_template`) "
                                                        "for a teacher checkpoint that carries none")

    @model_validator(mode="after")
    def _mixes(self) -> "DataSection":
        for name in ("distill", "instruct", "long"):
            for other in getattr(self, name).mix:
                if other == name or getattr(self, other).mix:
                    why = "is this corpus" if other == name else "mixes other corpora itself"
                    raise ValueError(f"data.{name}.mix: {other} {why}; a corpus mixes in corpora made of their own "
                                     "sources only")
        return self


class TeacherLogitsSection(Section):
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("batch_size", "nproc_per_node")
    top_k: int = Field(gt=0)
    # 300 bytes per token: the budget of the sparse logit store (at k = 64 it takes 276).
    max_bytes_per_token: int = Field(300, gt=0)
    batch_size: int = Field(1, gt=0, description="packed rows per teacher forward")
    positions: Literal["answer", "text"] = Field("answer", description="positions whose next token is supervised, or every text token")
    values: Literal["fp16", "bf16", "fp32"] = Field("fp16", description="how stored log-probs are encoded")
    nproc_per_node: int = Field(1, gt=0, description="GPUs, one torchrun process each")


class TrainStageSection(Section):
    # recompute_share trades memory for time and leaves the trained weights as they are
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("launcher", "loader_workers", "keep_last", "recompute_share")
    steps: int = Field(gt=0)
    lr: float = Field(gt=0)
    warmup_steps: int = Field(0, ge=0)
    seq_len: int = Field(gt=0)
    micro_batch_size: int = Field(1, gt=0)
    grad_accum: int = Field(1, gt=0)
    trainable: list[str] = Field(min_length=1, description="parameter-name patterns trained in this stage")
    checkpoint_every: int = Field(gt=0)
    launcher: Literal["python", "torchrun", "deepspeed"] = "python"
    nproc_per_node: int = Field(1, gt=0)
    deepspeed_config: str | None = Field(None, description="a DeepSpeed JSON merged over the generated config")
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: Literal[2, 3] = 2
    grad_clip: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine schedule floor, as a fraction of lr")
    gradient_checkpointing: bool = False
    recompute_share: float = Field(1.0, gt=0, le=1, description=(
        "with gradient_checkpointing: the share of blocks that recompute their activations, spread evenly over "
        "each stack; the others keep theirs (more memory, less recomputation: 0.5 every second block, 0.67 two "
        "in three)"))
    keep_last: int = Field(3, gt=0, description="committed checkpoints kept; older ones are deleted")
    loader_workers: int = Field(2, ge=0)
    loss_scale: float = Field(1000.0, gt=0, description="stage1a: factor on the layer-wise MSE (the authors used 1000)")

    @field_validator("trainable")
    @classmethod
    def _known_groups(cls, groups: list[str]) -> list[str]:
        from pipeline.train.params import GROUPS  # the training code owns the group names

        unknown = [g for g in groups if g not in GROUPS and not g.startswith("re:")]
        if unknown:
            raise ValueError(f"unknown group {unknown[0]!r}; groups: {', '.join(GROUPS)}, or re:<regex>")
        return groups


class KLStageSection(TrainStageSection):
    temperature: float = Field(1.0, gt=0)


class LoraSection(Section):
    r: int = Field(gt=0)
    alpha: int = Field(gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)
    merge: bool = Field(True, description="merge the adapters into the exported weights, or keep them beside")


class LongStageSection(TrainStageSection):
    """Stage III: with LoRA; the Stage II data it mixes in is the long corpus's `mix` (data.long.mix)."""
    lora: LoraSection


class TrainSection(Section):
    stage1a: TrainStageSection
    stage1b: KLStageSection
    stage2: TrainStageSection
    stage3: LongStageSection


class EvalSection(Section):
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("schedule",)
    target: str = Field("stage3", description="the stage whose checkpoint the final evaluation reads")
    benchmarks: list[str] = Field(min_length=1)
    max_samples: int | None = Field(None, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    schedule: str = Field("0 3 * * *", description="cron of the scheduled eval of the latest checkpoint")


class LaunchSection(Section):
    """How the GPU stages (teacher logits, I-a, I-b, II, III, eval) start: on `nnodes` nodes of
    `nproc_per_node` processes each, joined by torchrun's c10d rendezvous (docs/multinode.md). All run-only:
    a stage's fingerprint never covers how many machines computed it."""
    RUN_ONLY: ClassVar[tuple[str, ...]] = ("nnodes", "min_nnodes", "nproc_per_node", "rdzv_endpoint",
                                           "max_restarts", "join_timeout_s")
    nnodes: int = Field(1, gt=0, description="nodes every GPU stage spans; above 1 the stage's process on the "
                                             "leader node posts each launch to the other nodes' followers")
    min_nnodes: int | None = Field(None, gt=0, description="fewest nodes the group goes on with after losing one "
                                                           "(torchrun --nnodes=MIN:MAX); default nnodes: a lost "
                                                           "node's replacement is waited for")
    nproc_per_node: int | None = Field(None, gt=0, description="processes (GPUs) per node for every GPU stage; "
                                       "set, it wins over train.<stage>.nproc_per_node and "
                                       "teacher_logits.nproc_per_node; unset, each stage takes its own (eval 1)")
    rdzv_endpoint: str | None = Field(None, description="host:port of the leader node's rendezvous store; "
                                      "default: INFINITEVL_RDZV_ENDPOINT, which `python -m pipeline.multinode "
                                      "node` sets from the platform (Kubernetes, Slurm)")
    max_restarts: int = Field(3, ge=0, description="times torchrun's agents restart a failed group of several nodes "
                                                   "(a lost node, a crashed rank) before the stage fails; each "
                                                   "restart resumes from the newest committed checkpoint. On one "
                                                   "node a failed group fails the stage (the next run resumes)")
    join_timeout_s: int = Field(900, gt=0, description="how long agents wait for the group's nodes to join a "
                                                       "rendezvous (a restarted pod being scheduled)")

    @model_validator(mode="after")
    def _consistent(self) -> "LaunchSection":
        if self.min_nnodes is not None and self.min_nnodes > self.nnodes:
            raise ValueError(f"launch.min_nnodes ({self.min_nnodes}) is above launch.nnodes ({self.nnodes})")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"launch.rdzv_endpoint must be host:port (got {self.rdzv_endpoint!r})")
        return self


class RunConfig(Section):
    run: RunSection
    teacher: TeacherSection
    student: StudentSection
    data: DataSection
    teacher_logits: TeacherLogitsSection
    train: TrainSection
    eval: EvalSection
    launch: LaunchSection = Field(default_factory=LaunchSection)

    @model_validator(mode="after")
    def _stages_known_and_ordered(self) -> "RunConfig":
        unknown = [s for s in self.run.stages if s not in STAGE_ORDER]
        if unknown:
            raise ValueError(f"run.stages: unknown stage {unknown[0]!r}; known: {', '.join(STAGE_ORDER)}")
        positions = [STAGE_ORDER.index(s) for s in self.run.stages]
        if positions != sorted(set(positions)):
            raise ValueError(f"run.stages must list each stage once, in pipeline order: {', '.join(STAGE_ORDER)}")
        if self.eval.target not in STAGE_ORDER[:-1]:
            raise ValueError(f"eval.target: {self.eval.target!r} is not a stage before eval; "
                             f"one of: {', '.join(STAGE_ORDER[:-1])}")
        return self

    @model_validator(mode="after")
    def _dense_text_keeps_its_cells(self) -> "RunConfig":
        # A character a merged token: a processor capped under the picture's size shrinks the characters out of
        # their cells. The teacher's cap makes the task unlearnable; a sample-pictures corpus's cap shows the
        # students the text smaller than the teacher learned it, and every student reads worse than it could.
        # Checked here rather than in the teacher's section so that every cap too small is named at once.
        if "dense_text" not in (self.picture_kinds or ()):
            return self
        from pipeline.data import SAMPLE_PICTURES

        caps = [("teacher.train", self.teacher.train.max_pixels)]
        caps += [(f"data.{name}", corpus.max_pixels)
                 for name, corpus in (("distill", self.data.distill), ("instruct", self.data.instruct),
                                      ("long", self.data.long)) if SAMPLE_PICTURES in corpus.sources]
        problem = dense_text_caps_too_small(caps)
        if problem:
            raise ValueError(f"{problem} (teacher.train.pictures has dense_text; the corpora named are "
                             f"{SAMPLE_PICTURES})")
        return self

    @property
    def picture_kinds(self) -> list[str] | None:
        """The sample-picture kinds of this run: those the trained tiny teacher learned (None: all)."""
        return self.teacher.train.pictures if self.teacher.train is not None else None

    def section(self, dotted: str) -> Any:
        """A section or field by its dotted name (`train.stage2`, `run.seed`); None below an unset section."""
        node: Any = self
        for part in dotted.split("."):
            if node is None:
                return None
            node = getattr(node, part)
        return node


def load_config(source: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Reads YAML from a path or fsspec URL, applies `a.b.c=value` overrides, validates."""
    try:
        raw = yaml.safe_load(storage.read_text(source))
    except FileNotFoundError:
        raise ConfigError(f"config not found: {source}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {source} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {source} must be a YAML mapping, got {type(raw).__name__}")
    return config_from_dict(raw, overrides, origin=source)


def config_from_dict(raw: dict, overrides: list[str] | tuple[str, ...] = (), origin: str = "config") -> RunConfig:
    data = copy.deepcopy(raw)
    for item in overrides:
        apply_override(data, item)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid {origin}:\n" + format_errors(e)) from None


def apply_override(data: dict, item: str) -> None:
    """`train.stage1a.steps=5`: the value is read as YAML, so numbers, booleans and [lists] keep their type."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.field=value")
    parts = key.strip().split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, dict) else None
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML: {e}") from None


def format_errors(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        got = "" if err["type"] in ("missing", "value_error") else f" (got {err.get('input')!r})"
        lines.append(f"  {field}: {message}{got}")
    return "\n".join(lines)


def to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
