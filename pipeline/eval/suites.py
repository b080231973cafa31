"""Suite specs: how a benchmark is named in a config or on the command line (no heavy imports: the plan checks
them before any work starts)."""

from __future__ import annotations

import posixpath

BUILTIN = {"tiny": "tiny", "sample": "tiny", "pictures": "pictures", "longvideo": "longvideo"}


def resolve_suite(spec: str, data_root: str | None = None) -> tuple[str, str]:
    """A suite spec -> (report name, source): "tiny", "longvideo" or the URL of an Arrow eval file."""
    if spec in BUILTIN:
        return BUILTIN[spec], BUILTIN[spec]
    name, sep, url = spec.partition("=")
    if sep and name and url:
        return name, url
    if spec.endswith(".arrow"):
        return posixpath.basename(spec)[: -len(".arrow")], spec
    if data_root and "/" not in spec:
        return spec, f"{data_root.rstrip('/')}/{spec}.arrow"
    raise ValueError(f"unknown suite {spec!r}: use one of {sorted(BUILTIN)}, NAME=URL of an eval file "
                     "(pipeline.eval.importers), a URL ending in .arrow, or a name with a data root")
