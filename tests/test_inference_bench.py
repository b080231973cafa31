"""The inference bench: its tiny mode runs every code path on CPU and writes the results contract, and
its teacher KV cache (allocated once, written in place) gives the logits of transformers' own cache."""

from __future__ import annotations

import json
import os

import torch

from bench import inference


def test_tiny_bench_writes_every_section_and_the_summary(tmp_path):
    result = inference.main(["--tiny", "--out", str(tmp_path), "--prefill", "32,96", "--contexts", "64,128",
                             "--batches", "1,2", "--decode-steps", "2", "--stream-frames", "3",
                             "--stream-eager-frames", "3", "--single-max", "32", "--prefill-chunk", "32", "--breakdown-at", "64"])
    record = json.load(open(tmp_path / "inference.json"))
    assert record["bench"] == "inference" and record["device"].startswith("cpu")
    rows = record["rows"]
    assert not [r for r in rows if "error" in r]
    seen = {(r["bench"], r["model"], r["mode"]) for r in rows}
    assert seen >= {("prefill", "teacher", "one pass"), ("prefill", "student", "one pass"),
                    ("prefill", "student", "chunks of 32"), ("decode", "teacher", "eager"),
                    ("decode", "student", "eager"), ("streaming", "student", "eager (no CUDA)")}
    stream = next(r for r in rows if r["bench"] == "streaming")
    assert stream["tokens_per_frame"] == 6 and stream["state_bytes_same"]
    assert {"vision_ms_per_frame", "decoder_ms_per_frame", "patchify_ms_per_frame"} <= set(stream)
    parts = {r["model"]: r for r in rows if r["bench"] == "breakdown"}
    assert parts["teacher"]["mlp_ms"] > 0 and parts["student"]["gated deltanet_ms"] > 0
    summary = record["summary"]
    for key in ("prefill_speedup_128k", "decode_speedup_b8_128k", "decode_latency_ratio_128k_vs_8k", "streaming_fps",
                "streaming_memory_growth_mb"):
        assert isinstance(summary[key], (int, float)), key
    assert os.path.exists(tmp_path / "inference.png")
    assert result["summary"] == summary


def test_preallocated_teacher_cache_gives_the_logits_of_a_dynamic_cache(tiny_teacher):
    from transformers import DynamicCache

    teacher = tiny_teacher[0]
    torch.manual_seed(0)
    ours = inference.preallocated_kv_cache(teacher, batch=2, context=40, room=3, device="cpu", dtype=torch.float32)
    theirs = DynamicCache()
    for i, layer in enumerate(ours.layers):
        theirs.update(layer.keys.clone(), layer.values.clone(), i)
    ids = torch.randint(0, 200, (2, 3))
    with torch.no_grad():
        for i in range(3):  # steps write into the preallocated room
            a = teacher(input_ids=ids[:, i:i + 1], cache=ours, use_cache=True).logits
            b = teacher(input_ids=ids[:, i:i + 1], cache=theirs, use_cache=True).logits
            torch.testing.assert_close(a, b)
    assert ours.get_seq_length() == 43


def test_profile_rows_say_where_a_decode_step_and_a_frame_spend_their_time(tmp_path):
    result = inference.main(["--tiny", "--out", str(tmp_path), "--prefill", "32", "--contexts", "64,128",
                             "--batches", "1,2", "--decode-steps", "2", "--stream-frames", "0",
                             "--stream-eager-frames", "2", "--single-max", "32", "--prefill-chunk", "32",
                             "--breakdown-at", "0", "--profile"])
    profiled = [r for r in result["rows"] if "profile" in r]
    # the largest batch at the longest context (here 128), each model, and the streamed frame
    assert {(r["bench"], r["model"], r["batch"], r.get("context")) for r in profiled} == {
        ("decode", "teacher", 2, 128), ("decode", "student", 2, 128), ("streaming", "student", 1, None)}
    for r in profiled:
        p = r["profile"]
        assert p["calls"] >= 2 and p["launches_per_call"] > 0 and p["top"]
        assert 0.2 < sum(k["share"] for k in p["top"]) <= 1 + 1e-6  # the costliest of all: a part of the total
        assert p["busy_ms_per_call"] <= p["wall_ms_per_call"] * 1.05
    ops = {k["name"] for r in profiled if r["bench"] == "decode" for k in r["profile"]["top"]}
    assert any("mm" in name or "linear" in name for name in ops), ops  # the projections are where a step goes


def test_speculative_part_reports_acceptance_and_speed_against_greedy(tmp_path, one_thread):
    result = inference.main(["--speculative", "--tiny", "--out", str(tmp_path), "--spec-context", "24",
                             "--spec-new-tokens", "6", "--spec-draft-layers", "2", "--spec-draft-tokens", "3",
                             "--spec-lookup-tokens", "3"])
    record = json.load(open(tmp_path / "inference_speculative.json"))
    rows = {r["mode"]: r for r in record["rows"]}
    assert set(rows) == {"prefill only", "greedy", "layer-skip draft (2 layers)", "prompt lookup"}
    assert not [r for r in rows.values() if "error" in r]
    assert rows["greedy"]["forwards"] == 6 and rows["greedy"]["tokens_per_forward"] == 1.0
    draft = rows["layer-skip draft (2 layers)"]
    assert draft["matches_greedy"] and draft["new_tokens"] == 6 and 0 <= draft["acceptance"] <= 1
    assert draft["proposed"] >= 3 and draft["forwards"] <= 6
    summary = record["summary"]
    assert summary == result["summary"] and summary["draft_matches_greedy"] and summary["lookup_matches_greedy"]
    assert summary["draft_speedup_vs_greedy"] > 0
