"""One raw record → one training sample: checked turns, media at model resolution, tokens and labels.

The text is the teacher's chat template; each image or video is one pad token in it, expanded to one
token per merged patch of its grid, exactly as `InfiniteVLProcessor.__call__` does (in the "qwen3_vl" video
layout, Qwen3-VL's and Qwen3.5's, a video is one such run per temporal patch, each after its time in text).
Labels keep the assistant turns (their text and the end-of-turn token, so the model learns to stop) and are
-100 everywhere else.

An image's grid comes from its header (its size), and the image is stored as published, after one
check that it decodes; the loader's worker processes resize it to the grid, normalise and patchify it.
Video frames and document pages, which exist only once decoded, are resized here and stored as PNG.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field

from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from model.processing import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START, InfiniteVLProcessor

from . import media
from .config import CorpusConfig, SourceConfig
from .quarantine import BadRecord
from .sources import RawRecord
from .templates import ChatTemplateError, read_template_file
from .templates import choose as choose_template

IGNORE_INDEX = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
PLACEHOLDERS = {"<image>": "image", "<video>": "video", "<document>": "document"}


@dataclass
class Sample:
    sample_id: str
    source: str
    input_ids: list[int]
    labels: list[int]
    images: list[bytes] = field(default_factory=list)  # as published (document pages: PNG at model resolution)
    image_grid_thw: list[list[int]] = field(default_factory=list)
    videos: list[list[bytes]] = field(default_factory=list)  # PNG frames at model resolution
    video_grid_thw: list[list[int]] = field(default_factory=list)
    second_per_grid_ts: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


_processors: dict[tuple[str, str | None], InfiniteVLProcessor] = {}


def load_processor(name: str, chat_template: str | None = None,
                   storage_options: dict | None = None) -> InfiniteVLProcessor:
    """'tiny' builds the offline tiny processor (Qwen2.5-VL's; 'tiny:<family>' another family's, e.g.
    'tiny:qwen3_vl'); anything else is a saved processor folder, with the chat template found where its library
    saved it (`pipeline.data.templates`), or else the one in the `chat_template` file. Cached."""
    key = (name, chat_template)
    if key not in _processors:
        if name == "tiny" or name.startswith("tiny:"):
            from model.tiny import build_processor

            if chat_template is not None:
                raise ChatTemplateError(f"processor {name!r} has its own chat template; chat_template is for "
                                        "checkpoints that have none")
            _processors[key] = build_processor(family=name.partition(":")[2] or "qwen2_5_vl")
        else:
            configured = read_template_file(chat_template, storage_options) if chat_template else None
            template = choose_template(name, configured, chat_template)
            loaded = InfiniteVLProcessor.from_pretrained(name)
            _processors[key] = InfiniteVLProcessor(loaded.tokenizer, loaded.image_processor, chat_template=template,
                                                   video_layout=loaded.video_layout)
    return _processors[key]


def install_processor(name: str, chat_template: str | None, processor: InfiniteVLProcessor) -> None:
    """Seeds the cache, so a worker process gets the processor shipped to it instead of rebuilding it."""
    _processors[(name, chat_template)] = processor


def processor_fingerprint(processor: InfiniteVLProcessor) -> str:
    ip = processor.image_processor
    # the tokenizer as it maps text to ids: its padding and truncation settings are state a caller may have set
    # (a padded batch enables padding on the shared tokenizer) and change no token of a corpus
    tokenizer = json.loads(processor.tokenizer.backend_tokenizer.to_str())
    tokenizer.pop("padding", None)
    tokenizer.pop("truncation", None)
    parts = [json.dumps(tokenizer, sort_keys=True), processor.chat_template,
             repr((ip.patch_size, ip.merge_size, ip.temporal_patch_size, list(ip.image_mean), list(ip.image_std)))]
    if processor.video_layout != "qwen2_5_vl":  # videos tokenize otherwise; the default adds nothing, so the
        parts.append(processor.video_layout)   # fingerprints of corpora built before layouts existed still hold
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def tokenize_record(record: RawRecord, source: SourceConfig, config: CorpusConfig, processor: InfiniteVLProcessor,
                    sample_id: str, storage_options: dict | None = None) -> Sample:
    turns = check_turns(record.turns)
    images, videos, pages = _load_media(record, config, source, storage_options)
    messages = _messages(turns, n_images=len(images), has_video=bool(videos), n_pages=len(pages))
    min_px, max_px = config.pixels_for(source)
    sample = Sample(sample_id=sample_id, source=record.source, input_ids=[], labels=[])
    for data, size in images:
        h, w = _target_size(size, min_px, max_px, config.max_aspect_ratio, processor)
        sample.images.append(data)
        sample.image_grid_thw.append([1, h // processor.patch_size, w // processor.patch_size])
    for page in pages:
        png, grid = _fit_image(page, min_px, max_px, config.max_aspect_ratio, processor)
        sample.images.append(png)
        sample.image_grid_thw.append(grid)
    for clip in videos:
        frames, grid, seconds = _fit_video(clip, config, source, processor)
        sample.videos.append(frames)
        sample.video_grid_thw.append(grid)
        sample.second_per_grid_ts.append(seconds)
    merge = processor.merge_size ** 2
    video_counts = [t * h * w // merge for t, h, w in sample.video_grid_thw]
    video_texts = None
    if processor.video_layout == "qwen3_vl":  # each temporal patch its own pad run, after its time in text
        video_texts = ["".join(processor.frame_placeholder(t, 1) for t in processor.frame_times(len(frames), clip.fps))
                       for frames, clip in zip(sample.videos, videos)]
        video_counts = [h * w // merge for t, h, w in sample.video_grid_thw for _ in range(t)]
    ids, labels = tokenize_messages(messages, processor, video_texts)
    sample.input_ids, sample.labels = expand_media_tokens(
        ids, labels, processor, [t * h * w // merge for t, h, w in sample.image_grid_thw], video_counts)
    if len(sample) > config.max_len:
        raise BadRecord(f"sample overflows max_len: {len(sample)} tokens > {config.max_len}")
    return sample


# -- turns ------------------------------------------------------------------------------------------------------
def check_turns(turns) -> list[tuple[str, str]]:
    """(role, text) with roles normalised; an optional system turn, then user/assistant alternating."""
    if not isinstance(turns, list) or not turns:
        raise BadRecord("empty or malformed conversation")
    out = []
    for turn in turns:
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2 and isinstance(turn[1], str)):
            raise BadRecord("malformed turn: expected a role and a text")
        role = ROLES.get(str(turn[0]).lower()) if turn[0] is not None else None
        if role is None:
            raise BadRecord(f"wrong role: {turn[0]!r}")
        try:
            turn[1].encode("utf-8")
        except UnicodeEncodeError as exc:  # a JSON escape such as \ud83d without its other half
            raise BadRecord(f"not UTF-8: a lone surrogate {turn[1][exc.start]!r} in a {role} turn") from None
        out.append((role, turn[1]))
    body = out[1:] if out[0][0] == "system" else out
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    roles = [r for r, _ in body]
    if not body or roles != expected[:len(roles)]:
        raise BadRecord(f"wrong roles: turns must alternate user/assistant after an optional system turn, "
                        f"got {roles}")
    if roles[-1] != "assistant":
        raise BadRecord("wrong roles: the conversation does not end with an assistant turn")
    if any(role == "assistant" and not text.strip() for role, text in body):
        raise BadRecord("empty or malformed conversation: an assistant turn is empty")
    return out


def _messages(turns, n_images: int, has_video: bool, n_pages: int) -> list[dict]:
    """Chat messages with image/video parts where the placeholders were (or before the first question)."""
    if n_images and n_pages:
        raise BadRecord("malformed record: both images and a document")
    counts = {tag: sum(text.count(tag) for role, text in turns if role == "user") for tag in PLACEHOLDERS}
    for role, text in turns:
        if role != "user" and any(tag in text for tag in PLACEHOLDERS):
            raise BadRecord(f"malformed conversation: media placeholder in a {role} turn")
    expected = {"<image>": n_images, "<video>": int(has_video), "<document>": int(n_pages > 0)}
    for tag, n in expected.items():
        if counts[tag] not in (0, n):
            raise BadRecord(f"placeholder mismatch: {counts[tag]} {tag} in the text for {n} given")
    leading = [tag for tag, n in expected.items() if n and counts[tag] == 0]
    messages, first_user = [], True
    for role, text in turns:
        if role != "user":
            messages.append({"role": role, "content": text})
            continue
        parts = []
        if first_user:
            for tag in leading:
                parts += [{"type": "image"}] * n_images if tag == "<image>" else _media_parts(tag, n_images, n_pages)
            first_user = False
        for piece in _split_placeholders(text):
            parts += _media_parts(piece, n_images, n_pages) if piece in PLACEHOLDERS else (
                [{"type": "text", "text": piece}] if piece else [])
        messages.append({"role": "user", "content": parts})
    return messages


def _media_parts(tag: str, n_images: int, n_pages: int) -> list[dict]:
    if tag == "<video>":
        return [{"type": "video"}]
    if tag == "<document>":
        return [{"type": "image"}] * n_pages
    return [{"type": "image"}]  # each <image> tag stands for one image


def _split_placeholders(text: str) -> list[str]:
    return re.split("(" + "|".join(map(re.escape, PLACEHOLDERS)) + ")", text)


# -- media ------------------------------------------------------------------------------------------------------
def _load_media(record: RawRecord, config: CorpusConfig, source: SourceConfig, storage_options):
    """Images as (bytes as published, (width, height)), video clips, document pages."""
    images = []
    for x in record.images:
        data, what = (x, f"{record.location} {record.position}") if isinstance(x, bytes) else (
            media.read_media(x, "image", storage_options), x)
        images.append((data, media.image_size(data, what)))
    fps, max_frames = config.video_for(source)
    videos = [media.decode_video(record.video, fps, max_frames, storage_options)] if record.video else []
    pages = media.load_document(record.document, config.document.dpi, config.document.max_pages,
                                storage_options) if record.document else []
    return images, videos, pages


def _fit_image(image: Image.Image, min_pixels: int, max_pixels: int, max_ratio: float,
               processor: InfiniteVLProcessor) -> tuple[bytes, list[int]]:
    h, w = _target_size(image.size, min_pixels, max_pixels, max_ratio, processor)
    p = processor.patch_size
    return _png(image.resize((w, h), Image.BICUBIC) if (w, h) != image.size else image), [1, h // p, w // p]


def _target_size(size: tuple[int, int], min_pixels: int, max_pixels: int, max_ratio: float,
                 processor: InfiniteVLProcessor) -> tuple[int, int]:
    """(height, width) the processor resizes an image of `size` (width, height) to."""
    w, h = size
    ratio = max(w, h) / max(1, min(w, h))
    if ratio > max_ratio:
        raise BadRecord(f"absurd aspect ratio: {w}x{h} ({ratio:.0f}:1 > {max_ratio:.0f}:1)")
    try:
        return smart_resize(h, w, factor=processor.patch_size * processor.merge_size,
                            min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as exc:
        raise BadRecord(f"absurd aspect ratio: {exc}") from None


def _fit_video(clip: media.VideoClip, config: CorpusConfig, source: SourceConfig, processor: InfiniteVLProcessor):
    """Frames at the size of the source's pixel bounds, else the corpus's video bounds, else its image bounds."""
    min_px = source.min_pixels or config.video.min_pixels or config.min_pixels
    max_px = source.max_pixels or config.video.max_pixels or config.max_pixels
    h, w = _target_size(clip.frames[0].size, min_px, max_px, config.max_aspect_ratio, processor)
    frames = [_png(f.resize((w, h), Image.BICUBIC) if f.size != (w, h) else f) for f in clip.frames]
    tp, p = processor.temporal_patch_size, processor.patch_size
    # the processor pads the last temporal patch by repeating the final frame
    return frames, [math.ceil(len(frames) / tp), h // p, w // p], tp / clip.fps


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# -- tokens -----------------------------------------------------------------------------------------------------
def tokenize_messages(messages: list[dict], processor: InfiniteVLProcessor,
                      video_texts: list[str] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the chat-templated conversation and labels that keep only the assistant turns.

    Each assistant turn's characters are found by rendering the conversation up to it (with the
    generation prompt, so the span starts at its first answer character) and through it; tokens whose
    characters lie inside a span are supervised. `video_texts`: what each video's vision-start, pad, vision-end
    becomes in the text, in order (the "qwen3_vl" layout: one timed run per temporal patch); None keeps it.
    """
    def render(part, generation_prompt=False):
        return _lay_out_videos(processor.apply_chat_template(part, add_generation_prompt=generation_prompt),
                               video_texts)

    text = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(messages[:i], generation_prompt=True))
        through = render(messages[:i + 1])
        if not text.startswith(through) or start > len(through):
            raise BadRecord("chat template is not prefix-stable; cannot locate assistant turns")
        spans.append((start, len(through.rstrip())))
    enc = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [tok if any(s <= a and b <= e for s, e in spans) and b > a else IGNORE_INDEX
              for tok, (a, b) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def _lay_out_videos(text: str, video_texts: list[str] | None) -> str:
    """The i-th video placeholder (vision start, pad, vision end) of `text` replaced by video_texts[i]."""
    if video_texts is None:
        return text
    pieces = text.split(VISION_START + VIDEO_TOKEN + VISION_END)
    if len(pieces) - 1 > len(video_texts):
        raise BadRecord(f"placeholder mismatch: the chat template wrote {len(pieces) - 1} videos for "
                        f"{len(video_texts)} given")
    return pieces[0] + "".join(v + p for v, p in zip(video_texts, pieces[1:]))


def expand_media_tokens(ids: list[int], labels: list[int], processor: InfiniteVLProcessor,
                        image_counts: list[int], video_counts: list[int]) -> tuple[list[int], list[int]]:
    """Each image/video pad token becomes one per merged patch (pad tokens are never supervised)."""
    counts = {processor.image_token_id: iter(image_counts), processor.video_token_id: iter(video_counts)}
    n_img, n_vid = ids.count(processor.image_token_id), ids.count(processor.video_token_id)
    if (n_img, n_vid) != (len(image_counts), len(video_counts)):
        raise BadRecord(f"placeholder mismatch: {n_img} {IMAGE_TOKEN} / {n_vid} {VIDEO_TOKEN} tokens for "
                        f"{len(image_counts)} images / {len(video_counts)} videos")
    out_ids, out_labels = [], []
    for tok, lab in zip(ids, labels):
        if tok in counts:
            n = next(counts[tok])
            out_ids += [tok] * n
            out_labels += [IGNORE_INDEX] * n
        else:
            out_ids.append(tok)
            out_labels.append(lab)
    return out_ids, out_labels
