"""The loss and score plot of a stage's checkpoints, as a PNG data URI a markdown artifact can show.

An image artifact needs a URL the browser can reach; checkpoints live on S3 or a local disk the Prefect
UI cannot read, so the image travels inside the artifact instead.
"""

from __future__ import annotations

import base64
import io


def history_png_data_uri(history: list[dict], metrics: tuple[str, ...] = ("loss", "score")) -> str | None:
    series = {m: [(row["step"], row[m]) for row in history if isinstance(row.get(m), (int, float))] for m in metrics}
    series = {m: points for m, points in series.items() if points}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3), squeeze=False)
    for ax, (metric, points) in zip(axes[0], series.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o")
        ax.set_xlabel("step")
        ax.set_title(metric)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
