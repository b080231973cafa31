"""Training throughput of the student against its teacher architecture, full-size shapes, random weights,
one GPU, bf16, in the same process:

    python3 -m bench.train_throughput                 # H100: Stage I-b/II at 8K, Stage III (LoRA) at 32K
    python3 -m bench.train_throughput --tiny          # CPU smoke test on small shapes

Each row trains one model the way its stage does (same trainable groups, AdamW, gradient checkpointing,
LoRA on q/k/v/o/g at 32K, the stages' loss: next-token cross-entropy through the chunked LM head of
pipeline.train.losses) on one packed sequence per step, every token an answer, and reports tokens/s and MFU.

FLOPs are counted analytically per token (MFU excludes the recomputation of gradient checkpointing):
  matmuls   forward 2·P for every weight matrix a text token passes through (LM layers, LM head);
            backward 2·P for the input gradients of every layer below the last trainable one, plus 2·P
            for the weight gradients of trainable matrices (Stage II: the mixers; Stage III: only the LoRA
            adapters, whose P_lora count 6·P_lora: forward, input and weight gradients).
  attention forward 4·ctx·d (QKᵀ and AV over the ctx keys a query sees: (T+1)/2 causal, W sliding),
            backward twice that.
  GDN chunk forward per head, chunk C, key dim K, value dim V: 2C(2K+V) intra-chunk (QKᵀ, KKᵀ, attn·V),
            C² for the triangular solve, 2C(K+V) for the WY factors, 6KV for the state read-out, the
            delta and the state update; backward twice that.
The LM head here is a plain linear, so its chunks take their gradients in the forward pass: nothing recomputed.
MFU = FLOPs/token × tokens/s ÷ peak (H100/H200 SXM dense bf16: 989 TFLOP/s).
Gradient checkpointing (`--checkpointing auto`) is used only as far as a model's activations overflow the card
(no block recomputed, then a quarter, a third, half, two thirds, three quarters of them, then every block); each
row's `checkpointing` is the share of blocks it recomputed.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch

from bench.common import print_table, write_result
from bench.profiling import kernel_profile, show_profile

PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def flops_per_token(config, kind: str, seq: int, mixers_trained: bool, adapter_params: int = 0) -> float:
    """Per token; `adapter_params`: LoRA parameters in the decoder (Stage III, base weights frozen)."""
    t = config.text_config
    d, L = t.hidden_size, t.num_hidden_layers
    n_q, n_kv = t.num_attention_heads, t.num_key_value_heads
    hd = d // n_q
    types = getattr(t, "layer_types", None) if kind == "student" else ["full_attention"] * L
    mlp = 3 * d * t.intermediate_size
    attn_w = d * hd * (2 * n_q + 2 * n_kv)
    total = 0.0
    for i, lt in enumerate(types):
        if lt == "linear_attention":
            H, K, V = t.num_linear_heads, t.linear_head_dim, int(t.linear_head_dim * t.expand_v)
            mix_w = d * (2 * H * K + 2 * H * V + 2 * H) + H * V * d
            C = 64
            mix = H * (2 * C * (2 * K + V) + C * C + 2 * C * (K + V) + 6 * K * V)
        else:
            ctx = (seq + 1) / 2 if lt == "full_attention" else min(t.sliding_window, (seq + 1) / 2)
            mix_w, mix = attn_w, 4 * ctx * n_q * hd
        weights = mix_w + mlp
        grad_w = 2 * mix_w if mixers_trained else 0.0
        total += 2 * weights + 2 * weights + grad_w + 3 * mix
    total += 2 * d * t.vocab_size * 2  # LM head forward + input gradient
    return total + 6 * adapter_params


def run_case(kind: str, stage: str, seq: int, tiny: bool, steps: int, warmup: int, checkpointing: float,
             profile: bool = False) -> dict:
    """`checkpointing`: the share of blocks recomputed (0 none, 1 every block; pipeline.train.build)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from bench.param_count import qwen2_5_vl_3b_config
    from model import InfiniteVLConfig, InfiniteVLForConditionalGeneration
    from model.tiny import tiny_teacher_config, build_tokenizer
    from pipeline.train.build import enable_checkpointing
    from pipeline.train.lora import add_lora
    from pipeline.train.losses import answer_cross_entropy
    from pipeline.train.objectives import decoder_and_head
    from pipeline.train.params import select_trainable

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher_cfg = tiny_teacher_config(build_tokenizer()) if tiny else qwen2_5_vl_3b_config()
    torch.manual_seed(0)
    with torch.device(device):
        if kind == "teacher":
            teacher_cfg._attn_implementation = "sdpa"
            config = teacher_cfg
            model = Qwen2_5_VLForConditionalGeneration(teacher_cfg).to(dtype)
            layer_types = ["sliding_attention"] * teacher_cfg.text_config.num_hidden_layers  # every layer attends
        else:
            config = InfiniteVLConfig.from_teacher(teacher_cfg)
            model = InfiniteVLForConditionalGeneration(config).to(dtype)
            layer_types = config.text_config.layer_types
    model.train()
    if checkpointing:
        enable_checkpointing(model, checkpointing)
    if stage == "stage3":
        model = add_lora(model, dict(r=64, alpha=128, dropout=0.0,
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "g_proj"]))
        groups = ["lora"]
    else:
        groups = ["sliding_attn"] if kind == "teacher" else ["linear_attn", "sliding_attn"]
    select_trainable(model, groups, layer_types)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, config.text_config.vocab_size - 16, (1, seq), device=device)
    decoder, head = decoder_and_head(model)

    def step():
        hidden = decoder(input_ids=ids).last_hidden_state[0, :-1]
        loss, _ = answer_cross_entropy(hidden, ids[0, 1:], head)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    elapsed = time.perf_counter() - start
    tps = seq * steps / elapsed
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and "visual" not in n)
    fpt = flops_per_token(config, kind, seq, mixers_trained=stage != "stage3", adapter_params=adapters)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK.items() if k in name), None)
    row = {"model": kind, "stage": stage, "seq_len": seq, "checkpointing": round(checkpointing, 3), "tokens_per_s": round(tps, 1),
           "gflops_per_token": round(fpt / 1e9, 4), "mfu": round(fpt * tps / peak, 4) if peak else None,
           "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}
    if profile:
        row["profile"] = kernel_profile(step, calls=2, cuda=device.type == "cuda")
    del model, optimizer, params
    release_memory()
    return row


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


SHARES = (0.0, 0.25, 1 / 3, 0.5, 2 / 3, 0.75)  # "auto" tries these in turn, then every block


def run_case_fitting(kind, stage, seq, tiny, steps, warmup, checkpointing: str, profile: bool = False) -> dict:
    """`checkpointing` "auto": the least recomputation whose activations fit the card: no block recomputed, then a
    quarter, a third, half, two thirds, three quarters of them, then every block (the student's Gated DeltaNet
    activations overflowed an 80 GB H100 at 8K without any: 67.6 GB before the loss; at 32K half did not fit).
    Otherwise "off", "on" (every block) or a share of blocks."""
    if checkpointing != "auto":
        share = {"off": 0.0, "on": 1.0}.get(checkpointing)
        return run_case(kind, stage, seq, tiny, steps, warmup, float(checkpointing) if share is None else share,
                        profile)
    for share in SHARES:
        try:
            return run_case(kind, stage, seq, tiny, steps, warmup, share, profile)
        except torch.cuda.OutOfMemoryError:
            pass  # the retry runs after the except block: inside it the traceback still holds the model
        print(f"{kind} {stage} {seq}: out of memory " + ("without gradient checkpointing" if not share else
              f"recomputing {share:.2f} of the blocks") + ", retrying with more of it", flush=True)
        release_memory()
    return run_case(kind, stage, seq, tiny, steps, warmup, 1.0, profile)


def _checkpointing(value: str) -> str:
    try:
        ok = value in ("auto", "on", "off") or 0 < float(value) <= 1
    except ValueError:
        ok = False
    if ok:
        return value
    raise argparse.ArgumentTypeError(f"--checkpointing takes auto, on, off or a share of blocks in (0, 1], got {value!r}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="small shapes on CPU: a smoke test, not a measurement")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--checkpointing", default="auto", type=_checkpointing,
                    help="gradient checkpointing: auto (the least that fits), on, off, or the share of blocks "
                         "recomputed, e.g. 0.67")
    ap.add_argument("--cases", nargs="+", choices=["stage2", "stage3"], default=["stage2", "stage3"],
                    help="which rows to run (the summary needs both)")
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    ap.add_argument("--profile", action="store_true", help="a kernel profile of two more steps of each row")
    args = ap.parse_args()
    short, long = (256, 512) if args.tiny else (8192, 32768)
    cases = [(stage, seq) for stage, seq in (("stage2", short), ("stage3", long)) if stage in args.cases]
    config = {"shapes": "Qwen2.5-VL-3B", "dtype": "bf16", "steps": args.steps, "stage2": "8K, mixers trainable",
              "stage3": "32K, LoRA r=64", "checkpointing": args.checkpointing}
    rows = []
    for stage, seq in cases:
        for kind in ("teacher", "student"):
            rows.append(run_case_fitting(kind, stage, seq, args.tiny, args.steps, args.warmup, args.checkpointing,
                                         args.profile))
            print_table([{k: v for k, v in rows[-1].items() if k != "profile"}])
            if "profile" in rows[-1]:
                show_profile(f"{kind} {stage} {seq}: one training step", rows[-1]["profile"])
            if not args.tiny:  # after every row: a run cut short still leaves what it measured
                path = write_result("train_throughput", config, rows, summarize(rows, short, long),
                                    **({"out_dir": args.out} if args.out else {}))
                plot(rows, os.path.join(os.path.dirname(path), "train_throughput.png"))
    print_table([{k: v for k, v in r.items() if k != "profile"} for r in rows])
    print(summarize(rows, short, long))


def summarize(rows: list[dict], short: int, long: int) -> dict:
    """Student over teacher at each length, from rows of one run (None where a row is missing)."""
    by = {(r["model"], r["seq_len"]): r for r in rows}

    def speedup(seq):
        s, t = by.get(("student", seq)), by.get(("teacher", seq))
        return round(s["tokens_per_s"] / t["tokens_per_s"], 3) if s and t else None

    return {"speedup_8k": speedup(short), "speedup_32k": speedup(long),
            "mfu_student_8k": by.get(("student", short), {}).get("mfu"),
            "mfu_student_32k": by.get(("student", long), {}).get("mfu"),
            # the share of blocks recomputed (0 none, 1 every block): the goal is Stage III below 1
            "student_32k_checkpointing": by.get(("student", long), {}).get("checkpointing"),
            "teacher_32k_checkpointing": by.get(("teacher", long), {}).get("checkpointing")}


STAGE_NAMES = {"stage2": "Stage II", "stage3": "Stage III"}


def length_labels(rows: list[dict]) -> list[str]:
    """A label per sequence length, in increasing order, named by its rows' own stage (a run may hold one case)."""
    stage_of = {r["seq_len"]: r["stage"] for r in rows}
    return [f"{STAGE_NAMES.get(stage_of[n], stage_of[n])} {n // 1024}K" for n in sorted(stage_of)]


def plot(rows: list[dict], path: str) -> str | None:
    """Tokens/s and MFU of teacher and student at each length, bars side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (the JSON has every number)", flush=True)
        return None
    lengths = sorted({r["seq_len"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, kind in enumerate(("teacher", "student")):
        got = {r["seq_len"]: r for r in rows if r["model"] == kind}
        xs = [j + (i - 0.5) * 0.38 for j in range(len(lengths))]
        for ax, key in zip(axes, ("tokens_per_s", "mfu")):
            vals = [(got[n].get(key) or 0) if n in got else 0 for n in lengths]
            bars = ax.bar(xs, vals, width=0.38, label=kind)
            for b, n in zip(bars, lengths):
                if n in got:
                    ck = got[n]["checkpointing"]
                    ax.annotate("no recompute" if not ck else ("every block recomputed" if ck == 1 else
                                                               f"{ck:.2f} of blocks recomputed"),
                                (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    for ax, title in zip(axes, ("tokens / s", "MFU (dense bf16 peak)")):
        ax.set_xticks(range(len(lengths)), length_labels(rows))
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
