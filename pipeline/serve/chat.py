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
         top_p: float = 1.0, seed: int | None = None, cuda_graphs: bool = False, system: str | None = None,
         streamer=None) -> str:
    """The assistant's answer to `messages` (a prompt string or chat messages whose image/video entries take
    `images` and `video` in order), in the checkpoint's own chat template, stopping at its end of turn. A student
    decodes over its constant-size state (model.generation); a teacher through transformers' generate. `system`
    adds a system turn; `streamer` (transformers' protocol, e.g. TextStreamer) gets the tokens as they come."""
    images = [_image(i) for i in images or []]
    frames, fps = _video(video, video_fps, max_frames) if video is not None else (None, video_fps)
    if isinstance(messages, str):
        messages = [user_turn(messages, len(images), frames is not None)]
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text, images=images or None, videos=[frames] if frames is not None else None, video_fps=fps)
    stop = stop_ids(model, processor)
    if hasattr(model, "new_cache"):  # a student: constant-size state, CUDA graphs where asked
        tokens = generate(model, inputs, max_new_tokens=max_new_tokens, eos_token_id=stop, temperature=temperature,
                          top_p=top_p, seed=seed, cuda_graphs=cuda_graphs, streamer=streamer)
    else:
        tokens = _teacher_generate(model, inputs, max_new_tokens, stop, temperature, top_p, seed, streamer)
    return processor.decode(tokens[0].tolist(), skip_special_tokens=True).strip()


def stop_ids(model, processor) -> list[int]:
    """The tokens that end an answer: the model's end-of-sequence ids and the chat template's end of turn (a
    checkpoint whose generation config names only <|endoftext|> still stops where its turn ends)."""
    ids = model.generation_config.eos_token_id
    ids = set([] if ids is None else [ids] if isinstance(ids, int) else ids)
    for token in ("<|im_end|>", "<|endoftext|>"):
        found = processor.tokenizer.convert_tokens_to_ids(token)
        if isinstance(found, int) and found != processor.tokenizer.unk_token_id:
            ids.add(found)
    return sorted(ids)


def _teacher_generate(model, inputs, max_new_tokens, stop, temperature, top_p, seed, streamer):
    from pipeline.eval.runner import to_model_inputs

    if seed is not None:
        torch.manual_seed(seed)
    batch = to_model_inputs(inputs, model)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False}
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=stop, streamer=streamer,
                             pad_token_id=stop[0], **sampling)
    return out[:, batch["input_ids"].shape[1]:]


def user_turn(prompt: str, n_images: int = 0, with_video: bool = False) -> dict:
    content = [{"type": "image"}] * n_images + ([{"type": "video"}] if with_video else [])
    return {"role": "user", "content": content + [{"type": "text", "text": prompt}]}


def answer_from_checkpoint(checkpoint: str, prompt: str, images: Sequence[str] = (), video: str | None = None,
                           max_new_tokens: int = 256, video_fps: float = 2.0, max_frames: int = 64,
                           device: str = "auto", cuda_graphs: bool | None = None, system: str | None = None,
                           stream: bool = False) -> str:
    """What `infinitevl generate` prints: load a checkpoint of any family, teacher or student (on the GPU in bf16
    when there is one), and answer one prompt; with `stream` the answer is printed as it is generated."""
    from pipeline.eval.api import load_checkpoint

    if "://" not in checkpoint and not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"no checkpoint directory at {checkpoint}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    model, processor = load_checkpoint(checkpoint, device=device)
    streamer = None
    if stream:
        from transformers import TextStreamer

        streamer = TextStreamer(processor.tokenizer, skip_prompt=False, skip_special_tokens=True)
    graphs = device.startswith("cuda") if cuda_graphs is None else cuda_graphs
    return chat(model, processor, prompt, images=list(images), video=video, video_fps=video_fps,
                max_frames=max_frames, max_new_tokens=max_new_tokens, cuda_graphs=graphs, system=system,
                streamer=streamer)


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
