"""What a corpus build is: sources, how to tokenize and pack them, where the shards go, how to run.

A bad config fails when it is constructed, with pydantic naming the field. `CorpusConfig.build_hash()`
covers only what changes the bytes of the output, so running the same build on another engine or with
more workers is still the same build.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1


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


class SourceConfig(_Strict):
    """One input dataset.

    format `llava`: a .json list or .jsonl of records with `conversations` ([{from, value}]) and
    optional `image` (path or list), `video` (path) or `document` (PDF path or folder of page images);
    relative media paths resolve against `media_root` (default: the annotation file's folder).
    format `parquet`: Parquet file(s) with images as bytes (`images_column`: list of {bytes, path}
    structs or of binaries) and turns (`texts_column`: list of {user, assistant} or of {role, content}).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    format: Literal["llava", "parquet"]
    path: str = Field(min_length=1)
    media_root: str | None = None
    weight: float = Field(1.0, gt=0)
    images_column: str = "images"
    texts_column: str = "texts"
    min_pixels: int | None = Field(None, gt=0)
    max_pixels: int | None = Field(None, gt=0)


class CorpusConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    output: str = Field(min_length=1, description="fsspec URL of the build: s3://bucket/prefix or a local path")
    sources: list[SourceConfig] = Field(min_length=1)
    processor: str = Field("tiny", description="'tiny' (model.tiny.build_processor) or a saved processor folder")
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

    def build_hash(self, processor_fingerprint: str = "") -> str:
        """Hash of everything that decides the output bytes."""
        identity = self.model_dump(exclude={"output", "processor", "max_quarantine_rate", "engine", "workers", "engine_address"})
        identity["schema_version"] = SCHEMA_VERSION
        identity["processor_fingerprint"] = processor_fingerprint
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_yaml(cls, path: str) -> "CorpusConfig":
        import yaml

        with open(path) as f:
            return cls.model_validate(yaml.safe_load(f))
