"""The GPU bench's CPU smoke test, and what its imports pull in (the GPU image has no prefect or s3fs)."""

from __future__ import annotations

import json
import subprocess
import sys

from bench.teacher_logits import main


def test_tiny_bench_writes_the_summary_the_issue_names(tmp_path):
    main(["--tiny", "--tokens", "256", "--rows", "2", "--rounds", "1", "--top-k", "16", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "teacher_logits.json").read_text())
    summary = result["summary"]
    assert {"stage_vs_bare_forward", "bytes_per_token", "topk_mass"} <= set(summary)
    assert summary["stage_vs_bare_forward"] > 0 and 0 < summary["topk_mass"] < 1
    # 16 ids × 9 bits + 16 fp16 + 4: 18 + 32 + 4 = 54 bytes, plus Arrow framing of 2 rows
    assert summary["payload_bytes_per_token"] == 54 and 54 < summary["bytes_per_token"] < 60
    assert {r["mode"] for r in result["rows"]} == {"bare forward", "stage", "decoder only (no LM head)"}


def test_bench_imports_neither_prefect_nor_s3fs_nor_the_data_stage():
    code = ("import sys, bench.teacher_logits; "
            "print(sorted({m.split('.')[0] for m in sys.modules}), sorted(m for m in sys.modules if m.startswith('pipeline')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    top, ours = out.strip().split("] [")
    for name in ("prefect", "s3fs", "fsspec", "datasets", "deepspeed"):
        assert f"'{name}'" not in top
    assert "pipeline.data" not in ours and "pipeline.storage" not in ours
