"""Data-stage throughput: the instruction mix, built into a local S3 server (SeaweedFS) on this machine.

    python bench/data_throughput.py [--samples 384] [--workers 2]

Synthetic instruction data (pictures of 224² to 1344², LLaVA JSONL and Parquet, 1:1) is uploaded to the
server, built with the default process pool into max_len 8192 sequences, then read back through the
training loader. Prints a table and writes bench/results/data_throughput.json; summary figures are per
build worker (samples/s, MB of shards written/s) and the packed token utilisation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = [(224, 224), (448, 336), (672, 672), (896, 640), (1344, 1344), (336, 448)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=512, help="records per source (two sources)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples-per-shard", type=int, default=512)
    parser.add_argument("--loader-batches", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import s3fs

    from infra.s3server import s3_server
    from pipeline.data import synthetic
    from pipeline.data.build import build_corpus
    from pipeline.data.config import CorpusConfig
    from pipeline.data.loader import PackedLoader
    from pipeline.data.tokenize import load_processor

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, s3_server(buckets=["bench"]) as s3:
        opts = s3.storage_options
        synthetic.write_llava(Path(tmp, "llava"), args.samples, seed=1, sizes=SIZES)
        synthetic.write_parquet(Path(tmp, "parquet"), args.samples, seed=2, rows_per_file=128)
        s3fs.S3FileSystem(**opts).put(tmp + "/", "bench/src/", recursive=True)
        config = CorpusConfig(
            name="instruct", output="s3://bench/instruct", max_len=8192, max_pixels=1344 * 1344,
            samples_per_shard=args.samples_per_shard, workers=args.workers,
            sources=[{"name": "llava", "format": "llava", "path": "s3://bench/src/llava/annotations.jsonl"},
                     {"name": "parquet", "format": "parquet", "path": "s3://bench/src/parquet"}])
        load_processor(config.processor)  # built once here; forked workers inherit it
        started = time.perf_counter()
        manifest = build_corpus(config, opts, progress=True)
        build_s = time.perf_counter() - started

        loader = PackedLoader("s3://bench/instruct/manifest.json", load_processor("tiny"), num_workers=args.workers,
                              storage_options=opts)
        started, tokens, patches = time.perf_counter(), 0, 0
        for i, batch in enumerate(loader):
            tokens += batch["input_ids"].shape[1]
            patches += batch.get("pixel_values", batch["input_ids"]).shape[0]
            if i + 1 == args.loader_batches:
                break
        load_s = time.perf_counter() - started

    mb = sum(s["bytes"] for s in manifest["shards"]) / 1e6
    rows = [
        {"step": "build", "workers": args.workers, "seconds": round(build_s, 2), "samples": manifest["samples"],
         "samples_per_s": round(manifest["samples"] / build_s, 2),
         "samples_per_s_per_worker": round(manifest["samples"] / build_s / args.workers, 2),
         "mb_written": round(mb, 2), "mb_per_s_per_worker": round(mb / build_s / args.workers, 2),
         "tokens": manifest["tokens"], "sequences": manifest["sequences"],
         "token_utilization": round(manifest["token_utilization"], 4), "quarantined": manifest["quarantined"]},
        {"step": "loader", "workers": args.workers, "seconds": round(load_s, 2), "sequences": args.loader_batches,
         "sequences_per_s": round(args.loader_batches / load_s, 2), "tokens_per_s": round(tokens / load_s, 1),
         "image_patches_per_s": round(patches / load_s, 1)},
    ]
    result = {
        "bench": "data_throughput",
        "device": f"cpu: {os.cpu_count()} cores",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "config": {"corpus": "instruction mix (synthetic, LLaVA JSONL + Parquet 1:1)", "records": 2 * args.samples,
                   "image_sizes": [f"{w}x{h}" for w, h in SIZES], "max_len": 8192, "max_pixels": 1344 * 1344,
                   "samples_per_shard": args.samples_per_shard, "engine": "process", "workers": args.workers,
                   "storage": "SeaweedFS weed mini on 127.0.0.1 (s3://)",
                   "per_worker": "samples_per_s_per_worker and mb_per_s are divided by the build workers",
                   "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
                   "note": "the 2 cores are shared with other jobs; a load above 2 means they competed for them"},
        "rows": rows,
        "summary": {"samples_per_s_per_worker": rows[0]["samples_per_s_per_worker"],
                    "mb_per_s": rows[0]["mb_per_s_per_worker"],
                    "token_utilization": rows[0]["token_utilization"]},
    }
    _print(rows)
    out = ROOT / "bench" / "results" / "data_throughput.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _print(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    for row in rows:
        table = Table(title=f"data throughput: {row['step']}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in row.items():
            if k != "step":
                table.add_row(k, str(v))
        Console().print(table)


if __name__ == "__main__":
    main()
