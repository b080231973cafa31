"""Data-stage throughput on the paper's datasets in their published layouts, on a local S3 server.

    python -m bench.data_throughput [--images 256] [--videos 4] [--video-seconds 120] [--workers 2]

Writes, with `pipeline.data.layouts`, FineVision (PNG charts), LLaVA-OneVision-Data (JPEG) and LLaVA-1.5
(JPEG files beside the JSON list) with images from 224² to 1344², and LLaVA-Video-178K with videos of a
few minutes; uploads them to SeaweedFS on 127.0.0.1; builds an image corpus and a video corpus (8192-
token sequences, images up to 1344², 32 frames a video) with the process pool; then reads the image
corpus back through the training loader with one and two worker processes, and in process. Reports
build samples/s per build worker (per second a worker spends on its shards, and per second of the whole build, start-up of the
worker processes included) and loader tokens/s per loader worker, and writes
bench/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

SIZES = [(224, 224), (448, 336), (672, 672), (896, 640), (1344, 1344), (336, 448)]
MAX_LEN = 8192
MAX_PIXELS = 1344 * 1344


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256, help="records per image dataset (three datasets)")
    parser.add_argument("--videos", type=int, default=4, help="videos per LLaVA-Video subset (two subsets, "
                                                              "three records each)")
    parser.add_argument("--video-seconds", type=float, default=120.0)
    parser.add_argument("--workers", type=int, default=2, help="build worker processes")
    parser.add_argument("--samples-per-shard", type=int, default=128)
    parser.add_argument("--loader-batches", type=int, default=24)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import s3fs

    from bench.common import print_table, write_result
    from infra.s3server import s3_server
    from pipeline.data import layouts
    from pipeline.data.build import build_corpus
    from pipeline.data.config import CorpusConfig
    from pipeline.data.loader import PackedLoader
    from pipeline.data.tokenize import load_processor

    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp, s3_server(buckets=["bench"]) as s3:
        opts = s3.storage_options
        started = time.perf_counter()
        per = max(1, args.images // 4)
        half = args.images // 2
        layouts.write_finevision(tmp, {"CoSyn_400k_chart": half, "ai2d_merged": args.images - half}, seed=1,
                                 sizes=SIZES, rows_per_file=per, row_group_size=64, image_format="PNG")
        layouts.write_onevision(tmp, {"CLEVR-Math(MathV360K)": args.images}, seed=2, sizes=SIZES, rows_per_file=per,
                                row_group_size=64, image_format="JPEG")
        layouts.write_llava15(tmp, args.images, seed=3, sizes=SIZES, text_only_every=0)
        layouts.write_llava_video(tmp, {"1_2_m_academic_v0_1": args.videos, "1_2_m_youtube_v0_1": args.videos},
                                  seed=4, seconds=args.video_seconds, fps=4, size=(320, 240))
        s3fs.S3FileSystem(**opts).put(tmp + "/", "bench/src/", recursive=True)
        written_s = time.perf_counter() - started

        images = CorpusConfig(
            name="images", output="s3://bench/images", max_len=MAX_LEN, max_pixels=MAX_PIXELS, workers=args.workers,
            samples_per_shard=args.samples_per_shard,
            sources=[{"path": "s3://bench/src/FineVision"},
                     {"path": "s3://bench/src/LLaVA-OneVision-Data", "format": "llava-parquet"},
                     {"path": "s3://bench/src/llava_v1_5_mix665k.json"}])
        videos = CorpusConfig(
            name="videos", output="s3://bench/videos", max_len=MAX_LEN, max_pixels=MAX_PIXELS, workers=args.workers,
            samples_per_shard=max(1, 2 * 3 * args.videos // args.workers),
            sources=[{"path": "s3://bench/src/LLaVA-Video-178K/*/*.json", "fps": 2.0, "max_frames": 32}])
        load_processor(images.processor)
        rows = [_build_row("images (FineVision + LLaVA-OneVision + LLaVA-1.5)", images, opts, build_corpus, load),
                _build_row("videos (LLaVA-Video-178K)", videos, opts, build_corpus, load)]

        rows.append(_loader_row(1, args.loader_batches, opts, PackedLoader, load_processor))
        rows.append(_loader_row(2, args.loader_batches, opts, PackedLoader, load_processor))
        rows.append(_loader_row(0, args.loader_batches, opts, PackedLoader, load_processor))
        load.append(os.getloadavg()[0])

    for row in rows:
        print_table([row])
    config = {
        "datasets": "published layouts written by pipeline.data.layouts: FineVision (PNG), LLaVA-OneVision-Data "
                    "(JPEG), LLaVA-1.5 JSON + JPEG files, LLaVA-Video-178K JSON + mp4",
        "image_records": 3 * args.images, "image_sizes": [f"{w}x{h}" for w, h in SIZES],
        "video_records": 2 * 3 * args.videos, "video": f"{args.video_seconds:.0f} s, 320x240, 4 fps, mpeg4; "
                                                        "sampled at 2 fps up to 32 frames",
        "max_len": MAX_LEN, "max_pixels": MAX_PIXELS, "processor": "tiny (Qwen2.5-VL image processing, tiny tokenizer)",
        "engine": "process", "build_workers": args.workers, "loader_workers": "1, 2, and 0 (in process, CPU-timed)",
        "storage": "SeaweedFS weed mini on 127.0.0.1 (s3://)", "fixtures_written_s": round(written_s, 1),
        "load_average_1min": [round(x, 2) for x in load],
        "note": "2 CPU cores shared with other engineers' jobs while this ran: a load average above 2 means the "
                "workers competed for the cores, so per-worker rates are lower bounds",
    }
    summary = {"build_samples_per_s_per_worker_images": rows[0]["samples_per_s_per_worker"],
               "build_samples_per_cpu_s_per_worker_images": rows[0]["samples_per_cpu_s_per_worker"],
               "build_samples_per_s_per_worker_images_wall": rows[0]["samples_per_s_per_worker_wall"],
               "build_samples_per_s_per_worker_videos": rows[1]["samples_per_s_per_worker"],
               "loader_tokens_per_s_per_worker": rows[2]["tokens_per_s_per_worker"],
               "loader_tokens_per_s_two_workers": rows[3]["tokens_per_s"],
               "loader_tokens_per_cpu_s": rows[4]["tokens_per_cpu_s"]}
    path = write_result("data_throughput", config, rows, summary, device=f"cpu: {os.cpu_count()} cores")
    print(f"wrote {path}")


def _loader_row(workers: int, batches: int, opts, PackedLoader, load_processor) -> dict:
    """Packed batches of the image corpus: through one worker process (decoding, resizing and patchifying
    there, tensors handed over through shared memory), or in this process, timed on its CPU."""
    loader = PackedLoader("s3://bench/images/manifest.json", load_processor("tiny"), num_workers=workers,
                          storage_options=opts)
    stream = iter(loader)
    next(stream)  # a worker process starts and imports torch: not part of the rate
    started, cpu, tokens, patches = time.perf_counter(), time.process_time(), 0, 0
    for _ in range(batches):
        batch = next(stream)
        tokens += batch["input_ids"].shape[1]
        patches += batch.get("pixel_values", batch["input_ids"]).shape[0]
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    where = f"{workers} worker process{'es' if workers > 1 else ''}" if workers else "in process"
    row = {"step": f"loader (images corpus, {where})", "workers": workers, "seconds": round(seconds, 2),
           "sequences": batches, "tokens": tokens}
    if workers:
        row.update(tokens_per_s=round(tokens / seconds, 1),
                   tokens_per_s_per_worker=round(tokens / seconds / workers, 1),
                   image_patches_per_s_per_worker=round(patches / seconds / workers, 1))
    else:
        row.update(tokens_per_s=round(tokens / seconds, 1), tokens_per_cpu_s=round(tokens / cpu, 1))
    return row


def _build_row(name: str, config, opts, build_corpus, load: list) -> dict:
    started = time.perf_counter()
    manifest = build_corpus(config, opts, progress=False)
    seconds = time.perf_counter() - started
    load.append(os.getloadavg()[0])
    return {"step": f"build {name}", "workers": config.workers, "seconds": round(seconds, 2),
            "samples": manifest["samples"],
            # per second a worker spends on shards (reading, checking, tokenizing, packing, encoding) ...
            "samples_per_s_per_worker": round(manifest["samples"] / manifest["worker_seconds"], 1),
            # ... and per second of its CPU: what a worker with a core of its own does
            "samples_per_cpu_s_per_worker": round(manifest["samples"] / manifest["worker_cpu_seconds"], 1),
            # per second of the whole build: worker start-up, planning and writing included
            "samples_per_s_per_worker_wall": round(manifest["samples"] / seconds / config.workers, 1),
            "tokens": manifest["tokens"], "sequences": manifest["sequences"],
            "mb_written": round(sum(s["bytes"] for s in manifest["shards"]) / 1e6, 1),
            "token_utilization": round(manifest["token_utilization"], 4), "quarantined": manifest["quarantined"]}


if __name__ == "__main__":
    main()
