"""The student's token mixers, in the manner of flash-linear-attention's `fla.layers`: sliding-window attention
(`attention.py`) and the linear mixers, one module each, listed in `MIXERS`, the one table from a
`linear_mixer` name to its class (config validation, the model, conversion and the run config all read it).

Adding a mixer: one module holding a `LinearMixer` subclass (its parameters under fla's names, `init_parameters`,
`init_from_attention`, `allocate_state`, a forward with exact padding and packing, `check_config` for dims it
cannot run), its ops in model/ops/ if it brings a new recurrence, and one line in `MIXERS`.
"""

from __future__ import annotations

from ..config import ConfigError
from .attention import SlidingWindowAttention
from .base import AttentionWeights, LinearMixer
from .gated_deltanet import GatedDeltaNet
from .gla import GatedLinearAttention
from .kda import KimiDeltaAttention
from .mamba2 import Mamba2Mixer

MIXERS: dict[str, type[LinearMixer]] = {
    "gated_deltanet": GatedDeltaNet,
    "gla": GatedLinearAttention,
    "mamba2": Mamba2Mixer,
    "kda": KimiDeltaAttention,
}


def mixer_names() -> tuple[str, ...]:
    """The valid values of `linear_mixer` (for the run config's validation)."""
    return tuple(MIXERS)


def mixer_class(name: str) -> type[LinearMixer]:
    if name not in MIXERS:
        raise ConfigError(f"linear_mixer is {name!r}; allowed: {', '.join(MIXERS)}")
    return MIXERS[name]


__all__ = ["MIXERS", "AttentionWeights", "GatedDeltaNet", "GatedLinearAttention", "KimiDeltaAttention", "LinearMixer",
           "Mamba2Mixer", "SlidingWindowAttention", "mixer_class", "mixer_names"]
