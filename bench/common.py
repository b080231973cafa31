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
    """HEAD's short hash; INFINITEVL_COMMIT when set: a node sent the tree without its history (or with a stale
    one) is told which commit it runs."""
    if os.environ.get("INFINITEVL_COMMIT"):
        return os.environ["INFINITEVL_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=os.path.dirname(__file__), stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def provenance(device: str | None = None) -> dict:
    """Where and when a result was measured, and from which code: every result file's first keys."""
    return {"device": device or device_name(), "date": datetime.date.today().isoformat(), "commit": git_commit()}


def write_result(bench: str, config: dict, rows: list[dict], summary: dict, out_dir: str = RESULTS,
                 device: str | None = None) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{bench}.json")
    record = {"bench": bench, **provenance(device), "config": config, "rows": rows, "summary": summary}
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def add_result(key: str, bench: str, config: dict, rows: list[dict], summary: dict, out_dir: str = RESULTS,
               device: str | None = None) -> str:
    """Adds one run's rows to bench/results/<bench>.json beside those of other runs (`key` names the run, e.g. a
    teacher family and size): its rows, tagged with `run` = key and the device that measured them, replace the
    file's earlier rows of that key; its config (with device, date and commit) and summary go under `families`
    in the file's config and summary. The file's own device, date and commit stay those of its first run."""
    path = os.path.join(out_dir, f"{bench}.json")
    if not os.path.exists(path):
        write_result(bench, {}, [], {}, out_dir, device)
    with open(path) as f:
        record = json.load(f)
    device = device or device_name()
    record["rows"] = [r for r in record["rows"] if r.get("run") != key] + [
        {"run": key, "device": device, **r} for r in rows]
    record["config"].setdefault("families", {})[key] = {**config, "device": device,
                                                        "date": datetime.date.today().isoformat(),
                                                        "commit": git_commit()}
    record["summary"].setdefault("families", {})[key] = summary
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
