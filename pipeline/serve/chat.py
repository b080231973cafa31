"""Chat with images and video: messages in, answer text out.

Images are PIL images or paths/URLs; a video is a list of frames or a path/URL, decoded with PyAV at
`video_fps` frames per second (spread evenly, at a lower rate, when that would exceed `max_frames`).
A plain prompt string stands for one user turn holding the images, then the video, then the text.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from PIL import Image

from model.generation import generate
from pipeline.data.media import decode_video, load_image


def chat(model, processor, messages: str | list[dict], images: Sequence | None = None, video=None,
         video_fps: float = 2.0, max_frames: int = 64, max_new_tokens: int = 256, temperature: float = 0.0,
         top_p: float = 1.0, seed: int | None = None, cuda_graphs: bool = False) -> str:
    """The assistant's answer to `messages` (a prompt string or chat messages whose image/video entries
    take `images` and `video` in order)."""
    images = [_image(i) for i in images or []]
    frames, fps = _video(video, video_fps, max_frames) if video is not None else (None, video_fps)
    if isinstance(messages, str):
        messages = [user_turn(messages, len(images), frames is not None)]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text, images=images or None, videos=[frames] if frames is not None else None, video_fps=fps)
    tokens = generate(model, inputs, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                      cuda_graphs=cuda_graphs)
    return processor.decode(tokens[0].tolist(), skip_special_tokens=True).strip()


def user_turn(prompt: str, n_images: int = 0, with_video: bool = False) -> dict:
    content = [{"type": "image"}] * n_images + ([{"type": "video"}] if with_video else [])
    return {"role": "user", "content": content + [{"type": "text", "text": prompt}]}


def answer_from_checkpoint(checkpoint: str, prompt: str, images: Sequence[str] = (), video: str | None = None,
                           max_new_tokens: int = 256, video_fps: float = 2.0, max_frames: int = 64,
                           device: str = "auto", cuda_graphs: bool | None = None) -> str:
    """What `infinitevl generate` prints: load a local checkpoint (on the GPU in bf16 when there is one)
    and answer one prompt."""
    from model.checkpoint import load_pretrained

    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"no checkpoint directory at {checkpoint}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, processor = load_pretrained(checkpoint, dtype=dtype)
    if processor is None:
        raise FileNotFoundError(f"{checkpoint} holds no processor (tokenizer_config.json); save one beside the model")
    model.to(device)
    graphs = device.startswith("cuda") if cuda_graphs is None else cuda_graphs
    return chat(model, processor, prompt, images=list(images), video=video, video_fps=video_fps,
                max_frames=max_frames, max_new_tokens=max_new_tokens, cuda_graphs=graphs)


def _image(x) -> Image.Image:
    return load_image(os.fspath(x)) if isinstance(x, (str, os.PathLike)) else x


def _video(video, fps: float, max_frames: int) -> tuple[list, float]:
    """(frames, the rate they represent). Given frames beyond `max_frames` are thinned evenly."""
    if isinstance(video, (str, os.PathLike)):
        clip = decode_video(os.fspath(video), fps, max_frames)
        return clip.frames, clip.fps
    frames = list(video)
    if len(frames) <= max_frames:
        return frames, fps
    step = len(frames) / max_frames
    return [frames[int(i * step)] for i in range(max_frames)], fps / step
