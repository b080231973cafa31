"""The processor: a Qwen VLM's tokenizer, chat template and image processor, plus our own video path.

transformers' Qwen2.5-VL / Qwen3-VL processors need a video processor that imports torchvision, which does not
import on CPU-only machines, so videos are patchified here with the same patch layout the vision towers
expect, and images go through the PIL image processor.

Video placeholders follow the teacher family (`video_layout`): "qwen2_5_vl" expands a video's pad token to one
run of tokens and passes `second_per_grid_ts` (M-RoPE's time axis); "qwen3_vl" (Qwen3-VL, Qwen3.5) writes each
temporal patch as `<{t:.1f} seconds>` + vision start + its tokens + vision end, the time in text, as
transformers' Qwen3VLProcessor does.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", VISION_START, VISION_END, "<|vision_pad|>",
                  IMAGE_TOKEN, VIDEO_TOKEN]

# The Qwen2-VL chat template: a system turn by default, images and videos as vision-start/pad/end
# triples that the processor expands to one pad token per merged patch.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PROCESSOR_FILE = "infinitevl_processor.json"
VIDEO_LAYOUTS = ("qwen2_5_vl", "qwen3_vl")


class InfiniteVLProcessor:
    """Turns chat messages, images and video frames into the model's inputs.

    Video frames are given as a sequence of PIL images (or HxWxC uint8 arrays) with their sampling
    fps; consecutive frames are grouped by `temporal_patch_size` like the Qwen video processors; in the
    "qwen2_5_vl" layout `second_per_grid_ts` carries the time step of each temporal patch for M-RoPE, in the
    "qwen3_vl" layout each temporal patch's time is written in the text (`frame_times`, `frame_placeholder`).
    """

    def __init__(self, tokenizer, image_processor: Qwen2VLImageProcessorPil, chat_template: str | None = None,
                 video_layout: str = "qwen2_5_vl"):
        if video_layout not in VIDEO_LAYOUTS:
            raise ValueError(f"video_layout is {video_layout!r}; allowed: {', '.join(VIDEO_LAYOUTS)}")
        self.video_layout = video_layout
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATE
        self.tokenizer.chat_template = self.chat_template
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        self.merge_size = image_processor.merge_size
        self.patch_size = image_processor.patch_size
        self.temporal_patch_size = image_processor.temporal_patch_size

    # -- persistence -------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        with open(os.path.join(path, PROCESSOR_FILE), "w") as f:
            json.dump({"processor_class": type(self).__name__, "chat_template": self.chat_template,
                       "video_layout": self.video_layout}, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str) -> "InfiniteVLProcessor":
        """Loads ours, or a teacher checkpoint's tokenizer and preprocessor_config.json (its family, from
        config.json, says how videos are laid out)."""
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        meta = os.path.join(path, PROCESSOR_FILE)
        if os.path.exists(meta):
            with open(meta) as f:
                saved = json.load(f)
            return cls(tokenizer, image_processor, chat_template=saved.get("chat_template"),
                       video_layout=saved.get("video_layout", "qwen2_5_vl"))
        from .families import family_of_checkpoint

        family = family_of_checkpoint(path)
        # the processor's own template (the multimodal one) before the tokenizer's, as transformers' processors
        # read them, and as the data stage does (pipeline/data/templates.py): both must tokenize alike
        template = _template_file(path) or getattr(tokenizer, "chat_template", None)
        if template is None and family is not None:
            template = family.chat_template
        return cls(tokenizer, image_processor, chat_template=template,
                   video_layout=family.video_layout if family else "qwen2_5_vl")

    # -- text --------------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.chat_template
        )

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)

    # -- vision ------------------------------------------------------------------------------------------------
    def preprocess_images(self, images: Sequence[Image.Image], min_pixels: int | None = None,
                          max_pixels: int | None = None) -> dict:
        kwargs = {}
        if min_pixels is not None or max_pixels is not None:
            size = dict(self.image_processor.size)
            if min_pixels is not None:
                size["shortest_edge"] = min_pixels
            if max_pixels is not None:
                size["longest_edge"] = max_pixels
            kwargs["size"] = size
        out = self.image_processor([_to_rgb(im) for im in images], return_tensors="pt", **kwargs)
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def preprocess_video(self, frames: Sequence, fps: float, min_pixels: int | None = None,
                         max_pixels: int | None = None) -> dict:
        """Frames of one video → (patches, grid (t, h, w), seconds per temporal patch)."""
        if len(frames) == 0:
            raise ValueError("a video needs at least one frame")
        ip = self.image_processor
        tp = self.temporal_patch_size
        factor = self.patch_size * self.merge_size
        arrays = [np.asarray(_to_rgb(f), dtype=np.float32) for f in frames]
        h, w = arrays[0].shape[:2]
        rh, rw = smart_resize(h, w, factor=factor, min_pixels=min_pixels or ip.size["shortest_edge"],
                              max_pixels=max_pixels or ip.size["longest_edge"])
        pixels = []
        for f in frames:
            im = _to_rgb(f).resize((rw, rh), Image.BICUBIC)
            x = np.asarray(im, dtype=np.float32) / 255.0
            x = (x - np.asarray(ip.image_mean, np.float32)) / np.asarray(ip.image_std, np.float32)
            pixels.append(x.transpose(2, 0, 1))
        while len(pixels) % tp:
            pixels.append(pixels[-1])  # pad the last temporal patch by repeating the final frame (and its time)
        video = np.stack(pixels)  # T, C, H, W
        t, c = video.shape[0] // tp, video.shape[1]
        p, m = self.patch_size, self.merge_size
        gh, gw = rh // p, rw // p
        x = video.reshape(t, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, gh/m, gw/m, m, m, C, tp, p, p
        patches = x.reshape(t * gh * gw, c * tp * p * p)
        return {
            "pixel_values_videos": torch.from_numpy(np.ascontiguousarray(patches)),
            "video_grid_thw": torch.tensor([[t, gh, gw]]),
            "second_per_grid_ts": torch.tensor([tp / float(fps)]),
        }

    def frame_times(self, n_frames: int, fps: float) -> list[float]:
        """Seconds of each temporal patch of a video of `n_frames` sampled at `fps` (the mean time of its
        frames, the last frame repeated to fill the last patch): what the "qwen3_vl" layout writes."""
        tp = self.temporal_patch_size
        idx = list(range(n_frames)) + [n_frames - 1] * ((tp - n_frames % tp) % tp)
        return [(idx[i] + idx[i + tp - 1]) / 2 / float(fps) for i in range(0, len(idx), tp)]

    def frame_placeholder(self, seconds: float, tokens: int) -> str:
        """One temporal patch of a video in the "qwen3_vl" layout."""
        return f"<{seconds:.1f} seconds>" + VISION_START + VIDEO_TOKEN * tokens + VISION_END

    def __call__(self, text: str | list[str], images: Sequence | None = None, videos: Sequence | None = None,
                 video_fps: float | Sequence[float] = 2.0, min_pixels: int | None = None,
                 max_pixels: int | None = None, padding_side: str = "left", return_tensors: str = "pt") -> BatchFeature:
        """Expands each image/video pad token to its number of merged patches and tokenizes.

        `videos` is a list of frame lists. Batches are padded on `padding_side` (left for generation).
        """
        texts = [text] if isinstance(text, str) else list(text)
        data: dict = {}
        image_counts: list[int] = []
        if images:
            data.update(self.preprocess_images(images, min_pixels, max_pixels))
            merge = self.merge_size ** 2
            image_counts = (data["image_grid_thw"].prod(-1) // merge).tolist()
        video_counts: list = []
        if videos:
            fps_list = [video_fps] * len(videos) if isinstance(video_fps, (int, float)) else list(video_fps)
            parts = [self.preprocess_video(v, f, min_pixels, max_pixels) for v, f in zip(videos, fps_list)]
            data["pixel_values_videos"] = torch.cat([q["pixel_values_videos"] for q in parts])
            data["video_grid_thw"] = torch.cat([q["video_grid_thw"] for q in parts])
            video_counts = (data["video_grid_thw"].prod(-1) // self.merge_size ** 2).tolist()
            if self.video_layout == "qwen2_5_vl":
                data["second_per_grid_ts"] = torch.cat([q["second_per_grid_ts"] for q in parts])
            else:  # the time goes into the text, frame by frame
                video_counts = [
                    "".join(self.frame_placeholder(t, n // int(grid[0]))
                            for t in self.frame_times(len(frames), fps))
                    for n, grid, frames, fps in zip(video_counts, data["video_grid_thw"], videos, fps_list)]
                texts = [t.replace(VISION_START + VIDEO_TOKEN + VISION_END, VIDEO_TOKEN) for t in texts]
        texts = _expand(texts, IMAGE_TOKEN, image_counts)
        texts = _expand(texts, VIDEO_TOKEN, video_counts)
        self.tokenizer.padding_side = padding_side
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        ids = enc["input_ids"]
        mm = torch.zeros_like(ids, dtype=torch.int32)
        mm[ids == self.image_token_id] = 1
        mm[ids == self.video_token_id] = 2
        data.update(input_ids=ids, attention_mask=enc["attention_mask"], mm_token_type_ids=mm)
        return BatchFeature(data=data, tensor_type=None)


def _template_file(path: str) -> str | None:
    """A checkpoint's chat template kept beside the tokenizer (processor-level chat_template.jinja / .json)."""
    jinja, js = os.path.join(path, "chat_template.jinja"), os.path.join(path, "chat_template.json")
    if os.path.exists(jinja):
        with open(jinja) as f:
            return f.read()
    if os.path.exists(js):
        with open(js) as f:
            return json.load(f).get("chat_template")
    return None


def _to_rgb(x) -> Image.Image:
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    return Image.fromarray(np.asarray(x, dtype=np.uint8)).convert("RGB")


def _expand(texts: list[str], token: str, counts: list) -> list[str]:
    """Replaces the i-th `token` across the batch by counts[i] copies of it (or by counts[i] itself where it is
    a string: a whole placeholder)."""
    total = sum(t.count(token) for t in texts)
    if total != len(counts):
        raise ValueError(f"{total} {token} placeholders in the text but {len(counts)} inputs given")
    it = iter(counts)
    out = []
    for t in texts:
        pieces = t.split(token)
        s = pieces[0]
        for piece in pieces[1:]:
            n = next(it)
            # a sentinel so expanded tokens are not split again
            s += (n.replace(token, "\0") if isinstance(n, str) else "\0" * n) + piece
        out.append(s.replace("\0", token))
    return out
