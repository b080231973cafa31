"""What every bench writes: bench/results/<bench>.json with bench, device, date, commit, config, rows, summary."""

from __future__ import annotations

import datetime
import json
import os
import subprocess

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu: {os.cpu_count()} cores"


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(__file__)).strip()
    except Exception:
        return "unknown"


def write_result(bench: str, config: dict, rows: list[dict], summary: dict, out_dir: str = RESULTS,
                 device: str | None = None) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{bench}.json")
    record = {"bench": bench, "device": device or device_name(), "date": datetime.date.today().isoformat(),
              "commit": git_commit(), "config": config, "rows": rows, "summary": summary}
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for col in rows[0]:
        table.add_column(str(col))
    for row in rows:
        table.add_row(*(f"{v:,}" if isinstance(v, int) else f"{v:.4g}" if isinstance(v, float) else str(v)
                        for v in row.values()))
    Console(width=200).print(table)
