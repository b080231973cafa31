"""Teacher-logit stage throughput against a bare teacher forward, in the same run, same model, same batches.

    python3 -m bench.teacher_logits            # GPU: Qwen2.5-VL-3B shapes, random bf16 weights, 8K-token rows
    python3 -m bench.teacher_logits --tiny     # CPU smoke test: the tiny teacher, 512-token rows

It first checks on the tiny teacher that the installed transformers masks packed documents apart.
Each batch is one synthetic packed row of `--tokens` text tokens made of documents of random lengths,
given to the teacher as the stage gives it (position_ids [4, 1, T], use_cache=False, so attention is
masked per document). "bare" is the teacher's own forward (`model(...)`, logits for every position);
"stage" is what pipeline.teacher_logits does per row: the same forward, the LM head in chunks, top-k,
log-sum-exp and tail, encoding on the device, the copy to the host, one row per covered position in an
Arrow shard written to local disk by a writer thread. Positions policy "text" (every position but
document ends), so both compute logits for about the same positions. Modes alternate over `--rounds`
and each reports its median round; every attention implementation in `--attn` gets its own rows.

A third row per implementation times the decoder alone (no LM head), to show how much of the
difference the LM head and top-k take.

Summary: stage_vs_bare_forward (stage tokens/s / bare tokens/s, first --attn), bytes_per_token (bytes on
disk / covered positions), topk_mass and kl (fidelity on `--fidelity-positions` positions of one row).
With random weights the teacher's distribution is nearly flat, so topk_mass here is far below a trained
teacher's: it measures the code path, not Qwen2.5-VL-3B.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import tempfile
import time

import torch

from bench.common import print_table, write_result
from pipeline.teacher_logits.coverage import covered_mask
from pipeline.teacher_logits.encoding import SparseEncoding
from pipeline.teacher_logits.fidelity import fidelity_report
from pipeline.teacher_logits.shards import encode_rows, logit_row
from pipeline.teacher_logits.stream import encoded_stream


def build_teacher(tiny: bool, device: torch.device, attn: str, vocab: int | None = None):
    from transformers import Qwen2_5_VLForConditionalGeneration

    if tiny:
        from model.tiny import build_tokenizer, tiny_teacher_config

        config = tiny_teacher_config(build_tokenizer())
        if vocab:  # the real vocabulary on the tiny model: the store's bytes at Qwen's 18-bit ids, on a CPU
            config.text_config.vocab_size = vocab
    else:
        from bench.param_count import qwen2_5_vl_3b_config

        config = qwen2_5_vl_3b_config()
    config._attn_implementation = attn
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):  # built where it runs: no 7 GB fp32 copy on the host
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


@torch.no_grad()
def check_packed_masking() -> None:
    """Refuses to time anything unless this transformers masks packed documents from each other (it does
    from [4, 1, T] position ids without a cache; an older one may silently attend across documents)."""
    from model.tiny import build_tiny_teacher

    model, _ = build_tiny_teacher()
    torch.manual_seed(0)
    a, b = torch.randint(0, 500, (1, 40)), torch.randint(0, 500, (1, 24))
    text = torch.cat([torch.arange(40), torch.arange(24)]).view(1, 1, -1)
    packed = model(input_ids=torch.cat([a, b], 1), position_ids=text.expand(4, 1, -1), use_cache=False).logits
    alone = model(input_ids=b, use_cache=False).logits
    if not torch.allclose(packed[0, 40:], alone[0], atol=1e-4):
        raise SystemExit(f"transformers {__import__('transformers').__version__} does not mask packed documents "
                         "from [4, 1, T] position ids: install 5.25 (infra/wheelhouse.sh) before timing")


def synthetic_rows(n: int, tokens: int, vocab: int, doc_range: tuple[int, int], seed: int = 0) -> list[dict]:
    """Packed text rows: random token ids in documents of random lengths (the last one cut to fit)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(n):
        lens = []
        while sum(lens) < tokens:
            lens.append(min(int(torch.randint(*doc_range, (1,), generator=g)), tokens - sum(lens)))
        ids = torch.randint(0, vocab, (1, tokens), generator=g)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        text = torch.cat([torch.arange(n_) for n_ in lens])
        rows.append({"input_ids": ids, "cu_seqlens": cu, "sample_ids": [f"synthetic-{r}-{d}" for d in range(len(lens))],
                     "position_ids": text.view(1, 1, -1).expand(4, 1, -1).contiguous()})
    return rows


def device_inputs(row: dict, device: torch.device) -> dict:
    return {"input_ids": row["input_ids"].to(device, non_blocking=True),
            "position_ids": row["position_ids"].to(device, non_blocking=True)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def bare_forward(model, rows: list[dict], device: torch.device, decoder_only: bool = False) -> float:
    """The teacher's own forward (all logits), or with decoder_only its decoder without the LM head."""
    run = model.model if decoder_only else model
    sync(device)
    start = time.perf_counter()
    for row in rows:
        run(**device_inputs(row, device), use_cache=False)
    sync(device)
    return time.perf_counter() - start


def run_stage(model, rows: list[dict], masks: list[torch.Tensor], encoding: SparseEncoding, device: torch.device,
              out_dir: str, rows_per_shard: int, chunk: int) -> tuple[float, int, int]:
    """(seconds, bytes written, covered positions) for the whole per-row work of the stage."""
    items = ((i, device_inputs(row, device), mask.nonzero()[:, 0]) for i, (row, mask) in enumerate(zip(rows, masks)))
    written, covered, pending, commits = 0, 0, [], []

    def write(name: str, shard_rows: list[dict]) -> int:
        data = encode_rows(shard_rows)
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
        return len(data)

    sync(device)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(1) as writer:
        for i, data in encoded_stream(model, items, encoding, chunk):
            pending.append(logit_row(i, rows[i]["sample_ids"], masks[i], data))
            covered += len(data)
            if len(pending) == rows_per_shard:
                commits.append(writer.submit(write, f"shard-{len(commits):05d}.arrow", pending))
                pending = []
        if pending:
            commits.append(writer.submit(write, f"shard-{len(commits):05d}.arrow", pending))
        written = sum(c.result() for c in commits)
    sync(device)
    return time.perf_counter() - start, written, covered


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with the tiny teacher")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per packed row (8192; 512 with --tiny)")
    parser.add_argument("--rows", type=int, default=None, help="rows per round (8; 4 with --tiny)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--values", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--chunk", type=int, default=2048, help="positions per LM-head call")
    parser.add_argument("--attn", default=None, help="comma-separated attention implementations (default sdpa; "
                                                      "transformers' Qwen2.5-VL refuses flex_attention)")
    parser.add_argument("--vocab", type=int, default=None, help="with --tiny: vocabulary size (e.g. 151936)")
    parser.add_argument("--fidelity-positions", type=int, default=256)
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        parser.error("no GPU here: run with --tiny for the CPU smoke test")
    tokens = args.tokens or (512 if args.tiny else 8192)
    n_rows = args.rows or (4 if args.tiny else 8)
    attns = (args.attn or "sdpa").split(",")
    doc_range = (32, 256) if args.tiny else (256, 4096)

    check_packed_masking()
    model = build_teacher(args.tiny, device, attns[0], args.vocab)
    vocab = model.config.text_config.vocab_size
    encoding = SparseEncoding(args.top_k, vocab, args.values)
    rows = synthetic_rows(n_rows, tokens, vocab, doc_range)
    masks = [covered_mask("text", r["input_ids"][0], r["input_ids"][0], r["cu_seqlens"], ()) for r in rows]

    table, failures = [], {}
    bytes_per_token = None
    for attn in attns:
        try:
            model.set_attn_implementation(attn)
            with tempfile.TemporaryDirectory() as out_dir:
                bare_forward(model, rows[:1], device)  # warm-up: kernels, compilation, allocator
                run_stage(model, rows[:1], masks[:1], encoding, device, out_dir, 4, args.chunk)
                bare_s, stage_s, decoder_s = [], [], []
                for _ in range(args.rounds):
                    decoder_s.append(bare_forward(model, rows, device, decoder_only=True))
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    bare_s.append(bare_forward(model, rows, device))
                    bare_mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    seconds, written, covered = run_stage(model, rows, masks, encoding, device, out_dir, 4, args.chunk)
                    stage_mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
                    stage_s.append(seconds)
                bytes_per_token = written / covered
        except Exception as exc:  # noqa: BLE001 - one implementation failing must not lose the others' rows
            failures[attn] = f"{type(exc).__name__}: {exc}"[:500]
            print(f"{attn}: failed: {failures[attn]}")
            continue
        total = n_rows * tokens
        bare, stage, decoder = statistics.median(bare_s), statistics.median(stage_s), statistics.median(decoder_s)
        table.append({"attn": attn, "mode": "decoder only (no LM head)", "tokens": total,
                      "seconds": round(decoder, 4), "tokens_per_s": round(total / decoder, 1)})
        table.append({"attn": attn, "mode": "bare forward", "tokens": total, "seconds": round(bare, 4),
                      "tokens_per_s": round(total / bare, 1), "peak_gib": round(bare_mem / 2 ** 30, 2)})
        table.append({"attn": attn, "mode": "stage", "tokens": total, "seconds": round(stage, 4),
                      "tokens_per_s": round(total / stage, 1), "peak_gib": round(stage_mem / 2 ** 30, 2),
                      "stage_vs_bare": round(bare / stage, 4), "bytes_per_token": round(bytes_per_token, 2)})

    model.set_attn_implementation(attns[0] if attns[0] not in failures else "sdpa")
    mask = masks[0]
    positions = mask.nonzero()[:, 0][:: max(1, int(mask.sum()) // args.fidelity_positions)][:args.fidelity_positions]
    report = fidelity_report(model, device_inputs(rows[0], device), positions, encoding, args.chunk)
    print_table(table) if table else None
    print(f"fidelity on {report['positions']} positions: top-{args.top_k} mass {report['topk_mass']:.4g}, "
          f"KL(teacher || reconstructed) {report['kl_mean']:.4g} nats (random weights: a nearly flat teacher)")
    headline = next((r for r in table if r["mode"] == "stage"), {})
    summary = {"stage_vs_bare_forward": headline.get("stage_vs_bare"), "attn": headline.get("attn"),
               "bytes_per_token": round(bytes_per_token, 2) if bytes_per_token else None,
               "payload_bytes_per_token": encoding.bytes_per_position,
               "topk_mass": round(report["topk_mass"], 6), "kl": round(report["kl_mean"], 6),
               "kl_truncation_only": round(report["kl_truncation"], 6),
               "stage_tokens_per_s": headline.get("tokens_per_s")}
    config = {"teacher": f"tiny (model/tiny.py), vocab {vocab}" if args.tiny else "Qwen2.5-VL-3B shapes, random weights",
              "dtype": "fp32" if device.type == "cpu" else "bf16", "tokens_per_row": tokens, "rows_per_round": n_rows,
              "rounds": args.rounds, "doc_lengths": list(doc_range), "top_k": args.top_k, "values": args.values,
              "chunk": args.chunk, "positions": "text", "attn": attns, "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "failures": failures}
    print(f"stage at {summary['stage_vs_bare_forward']} of the bare forward's speed (goal >= 0.85)")
    if args.tiny and args.out is None:
        print("--tiny: not writing bench/results (pass --out DIR to keep the smoke-test result)")
        return
    print("wrote", write_result("teacher_logits", config, table, summary, **({"out_dir": args.out} if args.out else {})))


if __name__ == "__main__":
    main()
