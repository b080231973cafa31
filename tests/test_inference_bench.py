"""The inference bench: its tiny mode runs every code path on CPU and writes the results contract, and
its teacher KV cache (allocated once, written in place) gives the logits of transformers' own cache."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bench import inference
from model import FAMILIES, family_names
from model.tiny import build_processor


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
    for key in ("prefill_speedup_128k", "decode_speedup_b1_128k", "decode_latency_ratio_128k_vs_8k", "streaming_fps",
                "streaming_memory_growth_mb"):
        assert isinstance(summary[key], (int, float)), key
    # a figure is named by the batch it was measured at: batch 8 only where batch 8 ran
    assert (summary["decode_speedup_b8_128k"] is None) == (8 not in record["config"]["batches"])
    assert os.path.exists(tmp_path / "inference.png")
    assert result["summary"] == summary


@pytest.mark.parametrize("family", family_names())
def test_preallocated_teacher_cache_gives_the_logits_of_a_dynamic_cache(family):
    """Every family's teacher: its attention layers' keys/values preallocated, its own linear layers (Qwen3.5)
    in transformers' state layers, the same logits step by step as transformers' DynamicCache for that config."""
    from transformers import DynamicCache

    from model.tiny import build_tiny_teacher

    teacher = build_tiny_teacher(seed=0, family=family)[0]
    torch.manual_seed(0)
    ours = inference.preallocated_kv_cache(teacher, batch=2, context=40, room=3, device="cpu", dtype=torch.float32)
    theirs = DynamicCache(config=teacher.config)
    for i, layer in enumerate(ours.layers):
        if hasattr(layer, "_k"):
            theirs.layers[i].update(layer.keys.clone(), layer.values.clone())
    assert len(inference.kv_layers(ours)) == sum(FAMILIES[family].teacher_layer_kind(teacher.config.text_config, i)
                                                 == "attention" for i in range(len(ours.layers)))
    ids = torch.randint(0, 200, (2, 3))
    with torch.no_grad():
        for i in range(3):  # steps write into the preallocated room
            a = teacher(input_ids=ids[:, i:i + 1], cache=ours, use_cache=True).logits
            b = teacher(input_ids=ids[:, i:i + 1], cache=theirs, use_cache=True).logits
            torch.testing.assert_close(a, b)
    assert inference.kv_layers(ours)[0].keys.shape[-2] == 43


def test_another_family_runs_on_cpu_and_its_rows_join_the_results_of_others(tmp_path):
    """`--family qwen3_5 --tiny --add` on a results file that holds another run: that run's rows stay, this run's
    come tagged with its teacher and device, its config and summary under `families`."""
    base = {"bench": "inference", "device": "NVIDIA H200", "date": "2026-11-30", "commit": "abc", "config": {"a": 1},
            "rows": [{"bench": "prefill", "model": "teacher", "mode": "one pass", "batch": 1, "context": 8},
                     {"run": "qwen3_5 tiny", "bench": "decode", "model": "teacher", "mode": "eager", "batch": 1,
                      "context": 64, "error": "an earlier run of the same teacher"}],
            "summary": {"prefill_speedup_128k": 3.0}}
    (tmp_path / "inference.json").write_text(json.dumps(base))
    args = ["--tiny", "--family", "qwen3_5", "--add", "--out", str(tmp_path), "--prefill", "32", "--contexts", "64",
            "--batches", "1", "--decode-steps", "2", "--stream-frames", "0", "--stream-eager-frames", "2",
            "--single-max", "32", "--prefill-chunk", "32", "--breakdown-at", "32"]
    inference.main(args)  # its rows replace its own earlier ones
    record = json.load(open(tmp_path / "inference.json"))
    assert {k: record[k] for k in ("device", "date", "commit")} == {"device": "NVIDIA H200", "date": "2026-11-30",
                                                                     "commit": "abc"}
    assert record["rows"][0] == base["rows"][0]
    added = record["rows"][1:]
    assert added and not [r for r in added if "error" in r]
    assert {(r["run"], r["device"].split(":")[0]) for r in added} == {("qwen3_5 tiny", "cpu")}
    assert len([r for r in added if r["bench"] == "decode" and r["model"] == "teacher"]) == 1
    parts = {r["model"]: r for r in added if r["bench"] == "breakdown"}
    assert parts["teacher"]["gated deltanet_ms"] > 0 and parts["teacher"]["attention_ms"] > 0  # its own 3 : 1
    assert parts["student"]["gated deltanet_ms"] > 0 and parts["student"]["sliding attention_ms"] > 0
    run = record["config"]["families"]["qwen3_5 tiny"]
    assert run["family"] == "qwen3_5" and "6 gated_deltanet" in run["student"] and run["device"].startswith("cpu")
    assert record["summary"]["prefill_speedup_128k"] == 3.0
    assert isinstance(record["summary"]["families"]["qwen3_5 tiny"]["prefill_speedup_128k"], float)


def test_family_and_size_are_checked_against_the_published_shapes(capsys):
    for argv, message in ((["--family", "qwen3_vl"], "qwen3_vl is published as 2B, 4B, 8B, 32B"),
                          (["--family", "qwen3_vl", "--size", "3B"], "--size '3B'"),
                          (["--family", "llama", "--size", "7B"], "families are qwen2_5_vl, qwen3_5, qwen3_vl"),
                          (["--tiny", "--size", "4B"], "leave --size out")):
        with pytest.raises(SystemExit):
            inference.parse_args(argv)
        assert message in capsys.readouterr().err
    assert inference.parse_args([]).size == "3B"  # the default teacher: Qwen2.5-VL-3B, as before
    args = inference.parse_args(["--family", "qwen3_vl", "--size", "4B"])
    processor = build_processor(family="qwen3_vl")
    cfg = inference.build_models_config(False, processor, args.family, args.size)
    assert type(cfg) is FAMILIES["qwen3_vl"].teacher_class.config_class
    t = cfg.text_config  # Qwen3-VL-4B-Instruct's config.json
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.head_dim, t.vocab_size) == (2560, 9728, 36, 32, 8, 128, 151936)
    assert cfg.video_token_id == processor.video_token_id


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
