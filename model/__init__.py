"""InfiniteVL: hybrid students of Qwen VLMs (model/families/), their linear mixers (model/layers/, model/ops/),
conversion, cache, processor and checkpoint I/O."""

from .cache import InfiniteVLCache
from .config import ConfigError, default_layer_types
from .convert import (
    convert_from_qwen2_5_vl,
    convert_teacher,
    exact_student,
    init_mixer_from_attention,
    init_mixer_from_teacher,
    teacher_mixer,
)
from .families import FAMILIES, family_names, family_of, family_of_checkpoint, load_teacher
from .families.qwen2_5_vl import (
    InfiniteVLConfig,
    InfiniteVLForConditionalGeneration,
    InfiniteVLModel,
    InfiniteVLTextConfig,
    InfiniteVLTextModel,
)
from .layers import MIXERS, mixer_names
from .modeling import register_auto_classes
from .processing import InfiniteVLProcessor

register_auto_classes()

__all__ = [
    "FAMILIES",
    "MIXERS",
    "ConfigError",
    "InfiniteVLCache",
    "InfiniteVLConfig",
    "InfiniteVLForConditionalGeneration",
    "InfiniteVLModel",
    "InfiniteVLProcessor",
    "InfiniteVLTextConfig",
    "InfiniteVLTextModel",
    "convert_from_qwen2_5_vl",
    "convert_teacher",
    "default_layer_types",
    "exact_student",
    "family_names",
    "family_of",
    "family_of_checkpoint",
    "init_mixer_from_attention",
    "init_mixer_from_teacher",
    "load_teacher",
    "mixer_names",
    "teacher_mixer",
]
