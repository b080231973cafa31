"""Separate or packed input projections: what one GEMM over concatenated weights saves at decode shapes.

A decode step reads every decoder weight once. At batch ≤ 8 each projection is a thin GEMM (M rows against
an N×2048 weight): it is bound by reading the weight, and a weight of a few MB is too little work to reach
the card's bandwidth (launch, ramp-up and tail dominate). Gated DeltaNet reads six such weights from the
same input (q k v g a b, two of them 16 rows), attention three (q k v) and the MLP two (gate, up).

For each group and each M, both ways over the 3B student's layer count, each layer its own weights (so
nothing is served from L2), captured in one CUDA graph per way and replayed: milliseconds per pass over all
layers and the weight bandwidth that implies.

    python3 -m bench.projection_gemms [--out DIR]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench.common import RESULTS, print_table, write_result

HIDDEN = 2048
# output widths of the linears that read the same input, and how many layers have that group (3B student)
GROUPS = {
    "gdn q k v g a b": ([2048, 2048, 4096, 4096, 16, 16], 27),
    "swa q k v": ([2048, 256, 256], 9),
    "mlp gate up": ([11008, 11008], 36),
}
ROWS_M = [1, 8, 64, 258]


def graphed_ms(fn, replays: int = 50) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def measure(widths: list[int], layers: int, m: int) -> dict:
    dev, dt = "cuda", torch.bfloat16
    separate = [[torch.randn(n, HIDDEN, device=dev, dtype=dt) / 45 for n in widths] for _ in range(layers)]
    packed = [torch.cat(ws) for ws in separate]
    x = torch.randn(m, HIDDEN, device=dev, dtype=dt)

    def run_separate():
        for ws in separate:
            for w in ws:
                F.linear(x, w)

    def run_packed():
        for w in packed:
            F.linear(x, w)

    gb = sum(w.numel() for w in packed) * 2 / 1e9
    t_sep, t_pack = graphed_ms(run_separate), graphed_ms(run_packed)
    return {"m": m, "layers": layers, "weights_gb": round(gb, 3), "separate_ms": round(t_sep, 4),
            "packed_ms": round(t_pack, 4), "separate_tb_s": round(gb / t_sep, 2), "packed_tb_s": round(gb / t_pack, 2),
            "speedup": round(t_sep / t_pack, 2)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.projection_gemms measures CUDA GEMMs: it needs a GPU")
    rows = []
    for name, (widths, layers) in GROUPS.items():
        for m in ROWS_M:
            rows.append({"group": name, **measure(widths, layers, m)})
            torch.cuda.empty_cache()
    print_table(rows)
    summary = {f"{r['group']} m={r['m']}": r["speedup"] for r in rows}
    path = write_result("projection_gemms", {"hidden": HIDDEN, "groups": {k: v[0] for k, v in GROUPS.items()},
                                             "dtype": "bf16", "timing": "CUDA graph replays, 50"},
                        rows, summary, args.out)
    print(path)


if __name__ == "__main__":
    main()
