"""InfiniteVL: the hybrid model, its conversion from Qwen2.5-VL, cache, processor and checkpoint I/O."""

from .cache import InfiniteVLCache
from .config import ConfigError, InfiniteVLConfig, InfiniteVLTextConfig, default_layer_types
from .convert import convert_from_qwen2_5_vl
from .modeling import (
    InfiniteVLForConditionalGeneration,
    InfiniteVLModel,
    InfiniteVLTextModel,
    register_auto_classes,
)
from .processing import InfiniteVLProcessor

register_auto_classes()

__all__ = [
    "ConfigError",
    "InfiniteVLCache",
    "InfiniteVLConfig",
    "InfiniteVLForConditionalGeneration",
    "InfiniteVLModel",
    "InfiniteVLProcessor",
    "InfiniteVLTextConfig",
    "InfiniteVLTextModel",
    "convert_from_qwen2_5_vl",
    "default_layer_types",
]
