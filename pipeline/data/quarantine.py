"""Bad input is set aside with where it came from and why, counted, and never stops a build."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass


class BadRecord(Exception):
    """A record that cannot become a training sample; the message is the reason. A reader that could read
    the record's id sets `record_id`, so the quarantine names it."""

    record_id: str | None = None


@dataclass(frozen=True)
class QuarantineEntry:
    source: str
    location: str  # the file the record came from
    position: str  # "line 7" of a JSONL file, "item 3 (line 12)" of a JSON list, "row 12" of a Parquet file
    reason: str  # what is wrong, with the underlying library's own message
    record_id: str | None = None  # the record's own `id`, when it has one and it could be read

    @property
    def kind(self) -> str:
        """The reason without its particulars, for counting ("missing image: a.png" -> "missing image",
        "not UTF-8 at byte 17 (...): ..." -> "not UTF-8")."""
        return re.sub(r" at byte \d+.*", "", self.reason.split(":", 1)[0])


def to_jsonl(entries: list[QuarantineEntry]) -> bytes:
    return "".join(json.dumps(asdict(e), sort_keys=True) + "\n" for e in entries).encode()


def reason_counts(entries: list[QuarantineEntry]) -> dict[str, int]:
    return dict(sorted(Counter(e.kind for e in entries).items()))


class QuarantineRateExceeded(RuntimeError):
    pass


def check_rate(quarantined: int, total: int, max_rate: float, reasons: dict[str, int], where: str) -> None:
    """Fails the build when too much input is bad, showing what went wrong most often."""
    if total == 0 or quarantined / total <= max_rate:
        return
    top = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    lines = "\n".join(f"  {n:>7}  {reason}" for reason, n in top)
    raise QuarantineRateExceeded(
        f"{quarantined} of {total} records ({quarantined / total:.1%}) were quarantined, above the limit of "
        f"{max_rate:.1%}. Top reasons:\n{lines}\nDetails: {where}"
    )
