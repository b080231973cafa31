"""Teacher families: one module each (model/families/<name>.py defining `FAMILY`), found here by name.

Adding a family: one module (its student classes on the generic hybrid mixins, its `Family` with the
teacher's classes, config mapping, position rule, processor settings, layer conversion, tiny teacher and
published sizes) plus its tests; nothing else lists families.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil

from .base import Family

FAMILIES: dict[str, Family] = {}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base":
        _family = importlib.import_module(f"{__name__}.{_info.name}").FAMILY
        FAMILIES[_family.name] = _family


def family_names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def family_of(config_or_model_type) -> Family:
    """The family of a teacher or student config (or of its model_type, or a family name)."""
    key = config_or_model_type if isinstance(config_or_model_type, str) else config_or_model_type.model_type
    for family in FAMILIES.values():
        if key in (family.name, family.teacher_model_type, family.student_model_type,
                   family.text_config_class.model_type):
            return family
    known = ", ".join(f"{f.teacher_model_type} (student {f.student_model_type})" for f in FAMILIES.values())
    raise ValueError(f"no teacher family for model_type {key!r}; supported: {known}")


def family_of_checkpoint(path) -> Family | None:
    """The family named by a local checkpoint directory's config.json (None where it has none)."""
    config = os.path.join(os.fspath(path), "config.json")
    if not os.path.exists(config):
        return None
    with open(config) as f:
        model_type = json.load(f).get("model_type")
    if model_type is None:
        raise ValueError(f"{config} has no model_type: cannot tell which teacher family it is")
    return family_of(model_type)


def load_teacher(path, dtype=None, **kwargs):
    """A teacher checkpoint as its own transformers model, the family read from its config.json's model_type:
    a local directory (config.json and safetensors), or a Hugging Face Hub id (transformers resolves it, from its
    cache when offline). Other URLs are refused: copy the checkpoint to a local directory first."""
    path = os.fspath(path)
    if "://" in path:
        raise ValueError(f"{path} is a URL: model/ reads local directories (or Hub ids) only; copy the checkpoint "
                         "to a local directory first")
    family = family_of_checkpoint(path)
    if family is None:
        if os.path.isdir(path):
            raise FileNotFoundError(f"no config.json in {path}: not a teacher checkpoint directory")
        from transformers import PretrainedConfig

        family = family_of(PretrainedConfig.get_config_dict(path)[0].get("model_type", "unknown"))
    return family.load_teacher(path, dtype=dtype, **kwargs)


__all__ = ["FAMILIES", "Family", "family_names", "family_of", "family_of_checkpoint", "load_teacher"]
