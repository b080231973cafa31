"""What a corpus build is: sources, how to tokenize and pack them, where the shards go, how to run.

A bad config fails when it is constructed, with pydantic naming the field. `CorpusConfig.build_hash()`
covers only what changes the bytes of the output, so running the same build on another engine or with
more workers is still the same build.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# 2: images are stored as published (the loader resizes them), sample ids are the records' own
SCHEMA_VERSION = 2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VideoConfig(_Strict):
    fps: float = Field(2.0, gt=0, description="frames sampled per second of video")
    max_frames: int = Field(32, ge=1, description="at most this many frames; longer videos are sampled evenly")
    min_pixels: int | None = Field(None, gt=0)
    max_pixels: int | None = Field(None, gt=0)


class DocumentConfig(_Strict):
    dpi: float = Field(72.0, gt=0, le=600, description="PDF rendering resolution")
    max_pages: int = Field(16, ge=1, description="documents with more pages are quarantined")


FORMATS = ("llava", "parquet", "llava-parquet")
# the fields each format reads, and the column (Parquet) or key (JSON) each comes from by default
COLUMNS = {
    "llava": {"id": "id", "conversations": "conversations", "image": "image", "video": "video",
              "document": "document"},
    "parquet": {"id": "id", "images": "images", "texts": "texts"},
    "llava-parquet": {"id": "id", "image": "image", "conversations": "conversations"},
}
_GLOB = re.compile(r"[*?\[]")


class SourceConfig(_Strict):
    """One input dataset: a file, a folder or a glob of files in one of the published layouts.

    format `llava` (LLaVA-1.5 JSON, LLaVA-Video-178K): .json lists or .jsonl files of records with an
      `id`, `conversations` ([{from, value}]) and optionally `image` (a path or a list), `video` (a path;
      its `<image>` placeholder stands for the video) or `document` (a PDF or a folder of page images);
      media paths resolve against `media_root` (default: each annotation file's own folder).
    format `parquet` (FineVision, The Cauldron): rows with `images` (a list of {bytes, path}) and `texts`
      (a list of {user, assistant} turns, or of {role, content} messages).
    format `llava-parquet` (LLaVA-OneVision-Data): rows with `id`, `image` ({bytes, path}, or null for
      text-only rows) and `conversations` ([{from, value}]).
    `columns` renames those fields ({"images": "pictures"}); `name` defaults to the path's last plain part,
    `format` to `llava` for .json/.jsonl paths and `parquet` otherwise.
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    format: Literal["llava", "parquet", "llava-parquet"]
    path: str = Field(min_length=1, description="a file, a folder, or a glob (s3://bucket/LLaVA-Video-178K/*/*.json)")
    media_root: str | None = Field(None, description="where relative media paths of annotations resolve")
    weight: float = Field(1.0, gt=0)
    max_samples: int | None = Field(None, ge=1, description="take at most this many records (a seeded choice)")
    columns: dict[str, str] = Field(default_factory=dict, description="field -> column or key, where they differ")
    min_pixels: int | None = Field(None, gt=0, description="image (and video frame) size bounds of this source")
    max_pixels: int | None = Field(None, gt=0)
    fps: float | None = Field(None, gt=0, description="video frames sampled per second (default: the corpus's)")
    max_frames: int | None = Field(None, ge=1, description="at most this many frames per video (default: the corpus's)")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data):
        if isinstance(data, dict):
            data, path = dict(data), data.get("path")
            # without a path the error is about the path, not about what would have come from it
            if data.get("format") is None:
                data["format"] = default_format(path) if isinstance(path, str) else "llava"
            if data.get("name") is None:
                data["name"] = default_name(path) if isinstance(path, str) else "source"
        return data

    @model_validator(mode="after")
    def _known_columns(self) -> "SourceConfig":
        unknown = sorted(set(self.columns) - set(COLUMNS[self.format]))
        if unknown:
            raise ValueError(f"columns: {', '.join(unknown)} not read by format {self.format}; its fields are "
                             f"{', '.join(COLUMNS[self.format])}")
        return self

    def column(self, field: str) -> str:
        return self.columns.get(field, COLUMNS[self.format][field])


def default_format(path: str) -> str:
    return "llava" if path.rstrip("/").lower().endswith((".json", ".jsonl")) else "parquet"


def default_name(path: str) -> str:
    """The last part of the path that is not a glob, without its extension: s3://b/FineVision/ai2d_merged ->
    ai2d_merged, .../llava_v1_5_mix665k.json -> llava_v1_5_mix665k, s3://b/LLaVA-Video-178K/*/*.json ->
    LLaVA-Video-178K."""
    parts = [p for p in path.split("://", 1)[-1].rstrip("/").split("/") if p and not _GLOB.search(p)]
    base = re.sub(r"\.(jsonl?|parquet)$", "", parts[-1] if parts else "")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_") or "source"


class CorpusConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    output: str = Field(min_length=1, description="fsspec URL of the build: s3://bucket/prefix or a local path")
    sources: list[SourceConfig] = Field(min_length=1)
    processor: str = Field("tiny", description="'tiny' (model.tiny.build_processor; 'tiny:<family>' another "
                                               "family's) or a saved processor folder")
    chat_template: str | None = Field(None, description="a Jinja chat template file (path or URL; .json: its "
                                                        "`chat_template`), for a processor folder that has none")
    max_len: int = Field(8192, ge=16)
    min_pixels: int = Field(28 * 28 * 4, gt=0)
    max_pixels: int = Field(1344 * 1344, gt=0)
    max_aspect_ratio: float = Field(50.0, gt=1, le=200, description="wider or taller images are quarantined")
    samples_per_shard: int = Field(512, ge=1)
    num_samples: int | None = Field(None, ge=1, description="mix size; default: as many as the weights allow "
                                                            "without repeating any source")
    seed: int = 0
    video: VideoConfig = VideoConfig()
    document: DocumentConfig = DocumentConfig()
    # how to run: not part of the build's identity
    max_quarantine_rate: float = Field(0.05, ge=0, le=1)
    engine: Literal["process", "dask", "prefect-dask"] = "process"
    workers: int = Field(2, ge=1)
    engine_address: str | None = Field(None, description="an existing Dask scheduler (tcp://host:8786); "
                                                          "default: a local one with `workers` workers")

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"source names must be unique; repeated: {duplicated}")
        return sources

    @model_validator(mode="after")
    def _pixels(self) -> "CorpusConfig":
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) > max_pixels ({self.max_pixels})")
        return self

    def pixels_for(self, source: SourceConfig) -> tuple[int, int]:
        return source.min_pixels or self.min_pixels, source.max_pixels or self.max_pixels

    def video_for(self, source: SourceConfig) -> tuple[float, int]:
        """(frames per second, most frames) for the videos of `source`."""
        return source.fps or self.video.fps, source.max_frames or self.video.max_frames

    def build_hash(self, processor_fingerprint: str = "") -> str:
        """Hash of everything that decides the output bytes."""
        # the processor and its chat template count by content, through processor_fingerprint
        identity = self.model_dump(exclude={"output", "processor", "chat_template", "max_quarantine_rate", "engine",
                                            "workers", "engine_address"})
        identity["schema_version"] = SCHEMA_VERSION
        identity["processor_fingerprint"] = processor_fingerprint
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_yaml(cls, path: str) -> "CorpusConfig":
        import yaml

        with open(path) as f:
            return cls.model_validate(yaml.safe_load(f))
