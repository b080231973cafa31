"""The chat template of a checkpoint, found where the libraries that saved it put it.

In order: ours (`infinitevl_processor.json`, written by `InfiniteVLProcessor.save_pretrained`), then
transformers' processors: `chat_template.jinja` (transformers 5 and late 4.x), `chat_template.json`
(`{"chat_template": ...}`, transformers 4 processors), then the tokenizer's `tokenizer_config.json`
(a string, or a list of named templates of which `default` is the one). A checkpoint with none of these
is refused unless the run names a template file, so a corpus is never built with a template the
checkpoint was not trained with.
"""

from __future__ import annotations

import json
import os

from pipeline import storage

PLACES = ("infinitevl_processor.json", "chat_template.jinja", "chat_template.json", "tokenizer_config.json")


class ChatTemplateError(ValueError):
    """No chat template where one is needed, or two that disagree."""


def find_chat_template(folder: str) -> tuple[str, str] | None:
    """(template, the file it came from) of a checkpoint folder, or None."""
    for name in PLACES:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        template = text if name.endswith(".jinja") else _from_json(json.loads(text), path)
        if template:
            return template, path
    return None


def read_template_file(url: str, storage_options: dict | None = None) -> str:
    """A template named by the config: a Jinja file, or a JSON file with a `chat_template`."""
    text = storage.read_bytes(url, storage_options).decode("utf-8")
    if url.lower().endswith(".json"):
        template = _from_json(json.loads(text), url)
        if not template:
            raise ChatTemplateError(f"{url} holds no `chat_template`")
        return template
    return text


def choose(folder: str, configured: str | None, configured_from: str | None) -> str:
    """The template a build uses: the checkpoint's, else the configured one; refuses when there is none,
    and when both exist and differ (the later stages read the checkpoint's)."""
    found = find_chat_template(folder)
    if found is None:
        if configured is None:
            raise ChatTemplateError(
                f"{folder} has no chat template (looked for {', '.join(PLACES)}); name one in the run config "
                "(data.chat_template: a .jinja file, or a .json with `chat_template`), or add it to the checkpoint")
        return configured
    template, where = found
    if configured is not None and configured != template:
        raise ChatTemplateError(f"data.chat_template ({configured_from}) differs from the checkpoint's own ({where}); "
                                "the checkpoint's is the one it was trained with: drop data.chat_template, or "
                                "replace the checkpoint's file")
    return template


def _from_json(obj, where: str) -> str | None:
    template = obj.get("chat_template") if isinstance(obj, dict) else None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ChatTemplateError(f"{where}: chat_template is a {type(template).__name__}, not text")
    return template
