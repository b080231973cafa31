"""Running InfiniteVL inside VLMEvalKit, the toolkit the paper's numbers come from.

VLMEvalKit calls a model through `generate(message, dataset)`, where a message is a list of
`{"type": "image" | "video" | "text", "value": path or text}` dicts in reading order, and its `BaseModel.generate`
hands the checked message to `generate_inner`. `InfiniteVLChat` implements that interface on top of our
processor and greedy decoding; `vlmevalkit_model_class()` mixes it with VLMEvalKit's `BaseModel`, which
is imported only then, so this module loads where VLMEvalKit is not installed. Registration:
docs/vlmevalkit.md.
"""

from __future__ import annotations

import string

import torch
from PIL import Image

from .runner import EvalConfig, build_prompt, to_model_inputs, video_frames


class InfiniteVLChat:
    """VLMEvalKit's custom-model interface for an InfiniteVL (or Qwen2.5-VL teacher) checkpoint.

    custom_prompt: build multiple-choice and short-answer prompts the way our own runner does (the
    instructions the model was tuned with) instead of VLMEvalKit's generic ones.
    """

    INSTALL_REQ = False
    INTERLEAVE = True
    # Video datasets then hand over the video file itself, so frames keep their timing (M-RoPE time
    # positions) instead of arriving as unrelated images.
    VIDEO_LLM = True
    allowed_types = ["text", "image", "video"]

    def __init__(self, model_path: str | None = None, max_new_tokens: int = 128, min_pixels: int | None = None,
                 max_pixels: int | None = None, custom_prompt: bool = True, video_frames: int = 64,
                 video_max_pixels: int | None = None, device: str | None = None, dtype: str | None = None,
                 model=None, processor=None):
        if model is None:
            if model_path is None:
                raise ValueError("give model_path, or model and processor")
            from .api import load_checkpoint

            model, processor = load_checkpoint(model_path, device=device, dtype=dtype)
        self.model, self.processor = model, processor
        self.max_new_tokens = max_new_tokens
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.custom_prompt = custom_prompt
        self.video_frames, self.video_max_pixels = video_frames, video_max_pixels

    # -- message -> inputs -> text ------------------------------------------------------------------------------
    def build_inputs(self, message: list[dict]):
        content, images, videos, fps = [], [], [], []
        for item in message:
            if item["type"] == "image":
                content.append({"type": "image"})
                images.append(Image.open(item["value"]).convert("RGB"))
            elif item["type"] == "video":
                content.append({"type": "video"})
                frames, rate = video_frames({"video": item["value"]}, EvalConfig(video_frames=self.video_frames))
                videos.append(frames)
                fps.append(rate)
            elif item["type"] == "text":
                content.append({"type": "text", "text": item["value"]})
            else:
                raise ValueError(f"InfiniteVLChat takes text, image and video items, not {item['type']!r}")
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        # The processor takes one pixel limit per call; a message with a video uses the per-frame one.
        max_pixels = self.video_max_pixels if videos and self.video_max_pixels else self.max_pixels
        return self.processor(text=[text], images=images or None, videos=videos or None, video_fps=fps or 2.0,
                              min_pixels=self.min_pixels, max_pixels=max_pixels, padding_side="left")

    @torch.inference_mode()
    def generate_inner(self, message: list[dict], dataset: str | None = None) -> str:
        inputs = to_model_inputs(self.build_inputs(message), self.model)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()

    # -- prompts ------------------------------------------------------------------------------------------------
    def use_custom_prompt(self, dataset: str) -> bool:
        # Short-answer instructions suit extractive VQA only; MathVista and the like need free-form
        # answers for their judges, so they keep VLMEvalKit's prompts.
        if not self.custom_prompt or dataset is None:
            return False
        dataset_type = _dataset_type(dataset)
        return dataset_type == "MCQ" or (dataset_type == "VQA" and any(d in dataset for d in SHORT_ANSWER_DATASETS))

    def build_prompt(self, line, dataset: str) -> list[dict]:
        """Called by VLMEvalKit when use_custom_prompt is true; `dump_image` comes from its BaseModel."""
        paths = self.dump_image(line, dataset)
        text = prompt_for_line(line, _dataset_type(dataset))
        return [{"type": "image", "value": p} for p in paths] + [{"type": "text", "value": text}]


SHORT_ANSWER_DATASETS = ("DocVQA", "InfoVQA", "TextVQA", "ChartQA", "OCRVQA")


def prompt_for_line(line, dataset_type: str) -> str:
    """A VLMEvalKit data row (pandas Series or dict) as our runner would prompt it."""
    options = [str(line[c]) for c in string.ascii_uppercase if c in line and _present(line[c])]
    if dataset_type == "MCQ" and options:  # MMMU's open questions are MCQ rows without options
        hint = str(line["hint"]) if "hint" in line and _present(line["hint"]) else ""
        return build_prompt({"question": str(line["question"]), "hint": hint, "options": options, "metric": "mc"})
    return build_prompt({"question": str(line["question"]), "metric": "vqa"})


def _present(value) -> bool:
    return value is not None and value == value and str(value).strip() != ""  # NaN != NaN


def _dataset_type(dataset: str | None) -> str | None:
    if dataset is None:
        return None
    from vlmeval.dataset import DATASET_TYPE

    return DATASET_TYPE(dataset)


def vlmevalkit_model_class(name: str = "InfiniteVL") -> type:
    """InfiniteVLChat combined with VLMEvalKit's BaseModel (input checks, `generate`, `dump_image`)."""
    try:
        from vlmeval.vlm.base import BaseModel
    except ImportError as e:
        raise ImportError("VLMEvalKit is not installed: pip install -e <VLMEvalKit checkout> "
                          "(see docs/vlmevalkit.md)") from e
    return type(name, (InfiniteVLChat, BaseModel), {"__module__": __name__})
