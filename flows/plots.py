"""The loss and score plot of a stage's checkpoints, as a PNG data URI a markdown artifact can show.

An image artifact needs a URL the browser can reach; checkpoints live on S3 or a local disk the Prefect
UI cannot read, so the image travels inside the artifact instead.
"""

from __future__ import annotations

import base64

from pipeline.report import line_plot_png


def history_png_data_uri(history: list[dict], metrics: tuple[str, ...] = ("loss", "score")) -> str | None:
    series = {m: [(row["step"], row[m]) for row in history if isinstance(row.get(m), (int, float))] for m in metrics}
    series = {m: points for m, points in series.items() if points}
    if not series:
        return None
    return png_data_uri(line_plot_png(series))


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
