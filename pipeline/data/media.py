"""Images, video frames and document pages from any fsspec URL, as PIL images.

Video is decoded with PyAV: it binds the real FFmpeg libraries (every container and codec FFmpeg
reads), seeks by timestamp so a long video costs only the frames sampled from it, ships as wheels with
FFmpeg inside, and needs no torchvision (whose wheels are CUDA builds that fail to import on CPU hosts).
PDF pages are rendered with pypdfium2 (PDFium in a wheel, no system libraries).
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from pipeline import storage

from .quarantine import BadRecord

# media readers the base install has but a bare GPU image may lack: module -> (what it is, what to install)
MEDIA_PACKAGES = {"av": ("PyAV", "av"), "pypdfium2": ("pypdfium2", "pypdfium2")}


class MissingMediaSupport(RuntimeError):
    """A video or document needs a package this environment lacks: every record of its kind would fail, so the
    stage stops instead of quarantining them one by one."""


def missing_package(module: str) -> str:
    """The package behind `module`, said missing, with how to install it."""
    name, pip = MEDIA_PACKAGES[module]
    return (f"{name}, which this environment lacks: pip install {pip} (an air-gapped GPU node: build the wheelhouse "
            "with WITH_MEDIA=1, infra/wheelhouse.sh)")


def media_module(module: str, what: str):
    """`module` imported, or MissingMediaSupport saying what needed it and how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingMediaSupport(f"{what} needs {missing_package(module)}") from None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def resolve(ref: str, root: str) -> str:
    """A media path from an annotation: URLs and absolute paths as they are, others under `root`."""
    if "://" in ref or ref.startswith("/"):
        return ref
    return storage.join(root, ref)


# modes that convert to RGB (the loader's first step); others are tried once here
_TO_RGB = {"RGB", "RGBA", "RGBX", "L", "LA", "La", "P", "PA", "1", "CMYK", "YCbCr", "I", "F"}


def image_size(data: bytes, what: str) -> tuple[int, int]:
    """(width, height) of an encoded image, once it is known to decode: a JPEG is decoded at 1/8 scale
    (every coded byte is still read, the inverse transform mostly skipped), anything else in full."""
    try:
        image = Image.open(io.BytesIO(data))
        size = image.size
        if isinstance(image, JpegImageFile):
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        image.load()
        if image.mode not in _TO_RGB:
            image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder failure makes the record unusable
        raise BadRecord(f"unreadable image: {what} ({type(exc).__name__}: {exc})") from None
    return size


def open_image(data: bytes, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder failure makes the record unusable
        raise BadRecord(f"unreadable image: {what} ({type(exc).__name__}: {exc})") from None


def load_image(url: str, storage_options: dict | None = None) -> Image.Image:
    return open_image(read_media(url, "image", storage_options), url)


def read_media(url: str, what: str, storage_options: dict | None) -> bytes:
    try:
        return storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        raise BadRecord(f"missing {what}: {url}") from None
    except OSError as exc:
        raise BadRecord(f"unreadable {what}: {url} ({storage.redact(str(exc), storage_options)})") from None


# -- video -----------------------------------------------------------------------------------------------------
@dataclass
class VideoClip:
    frames: list[Image.Image]
    timestamps: list[float]  # seconds from the start of the video
    fps: float  # the sampling rate the frames represent (lower than asked when max_frames capped them)


def decode_video(url: str, fps: float, max_frames: int, storage_options: dict | None = None) -> VideoClip:
    """Samples frames at `fps`, or `max_frames` spread evenly over a longer video."""
    av = media_module("av", f"reading the video {url}")
    data = read_media(url, "video", storage_options)
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            duration = _duration(container, stream)
            count = max(1, min(max_frames, math.floor(duration * fps + 1e-6)))
            rate = fps if duration * fps <= max_frames else count / duration
            times = [i / rate for i in range(count)]
            frames = _frames_at(container, stream, times)
    except BadRecord:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken container or stream
        raise BadRecord(f"unreadable video: {url} ({type(exc).__name__}: {exc})") from None
    return VideoClip(frames, times, rate)


def _duration(container, stream) -> float:
    if stream.duration is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    raise BadRecord("unreadable video: no duration")


def _frames_at(container, stream, times: list[float], seek_gap: float = 2.0) -> list[Image.Image]:
    """The frame on screen at each time: decode forward, seeking when the next time is far ahead."""
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    out, decoded, shown, upcoming = [], None, None, None
    for t in times:
        t += start
        if decoded is None or (upcoming is not None and t - upcoming.time > seek_gap):
            # seeks land on the keyframe at or before t; decoding forward from there is exact
            container.seek(max(0, int(t / stream.time_base)), stream=stream, backward=True)
            decoded = container.decode(stream)
            shown, upcoming = None, next(decoded, None)
        while upcoming is not None and upcoming.time <= t + 1e-6:
            shown, upcoming = upcoming, next(decoded, None)
        frame = shown or upcoming
        if frame is None:
            raise BadRecord("unreadable video: no frames decoded")
        out.append(frame.to_image().convert("RGB"))
    return out


# -- documents -------------------------------------------------------------------------------------------------
def load_document(url: str, dpi: float, max_pages: int, storage_options: dict | None = None) -> list[Image.Image]:
    """Pages of a PDF rendered at `dpi`, or the images of a page folder in page order."""
    if url.lower().endswith(".pdf"):
        return _render_pdf(read_media(url, "document", storage_options), url, dpi, max_pages)
    pages = [u for u in _list(url, storage_options) if u.lower().endswith(IMAGE_SUFFIXES)]
    if not pages:
        raise BadRecord(f"missing document: no page images in {url}")
    if len(pages) > max_pages:
        raise BadRecord(f"document too long: {len(pages)} pages > {max_pages}")
    return [load_image(u, storage_options) for u in sorted(pages, key=_natural_key)]


def _list(url: str, storage_options: dict | None) -> list[str]:
    try:
        return storage.list_files(url, storage_options)
    except OSError as exc:
        raise BadRecord(f"missing document: {url} ({storage.redact(str(exc), storage_options)})") from None


def _render_pdf(data: bytes, url: str, dpi: float, max_pages: int) -> list[Image.Image]:
    pdfium = media_module("pypdfium2", f"rendering the document {url}")

    try:
        pdf = pdfium.PdfDocument(data)
    except Exception as exc:  # noqa: BLE001
        raise BadRecord(f"unreadable document: {url} ({type(exc).__name__}: {exc})") from None
    try:
        if len(pdf) == 0:
            raise BadRecord(f"unreadable document: {url} has no pages")
        if len(pdf) > max_pages:
            raise BadRecord(f"document too long: {len(pdf)} pages > {max_pages}")
        return [pdf[i].render(scale=dpi / 72.0).to_pil().convert("RGB") for i in range(len(pdf))]
    finally:
        pdf.close()


def _natural_key(url: str):
    """page2 before page10."""
    name = url.rsplit("/", 1)[-1]
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
