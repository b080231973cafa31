"""Where a call's time goes, kernel by kernel: the profile rows the benches add with `--profile`.

A step that is slower than its FLOPs and bytes say is either launch-bound (many short kernels with the GPU
idle between them) or spends its time in a few slow kernels; the two need different fixes (CUDA graphs or
fusion against a better kernel). One profile says which: kernels per call, kernel time against wall time
(the rest is the GPU waiting for the host), and the kernels that take the most time.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


def kernel_profile(fn: Callable[[], object], calls: int = 5, cuda: bool | None = None, top: int = 12) -> dict:
    """Runs `fn` once to warm up, then `calls` times under torch.profiler. On CUDA it reads the device's
    kernels; on the CPU, the operators' own time (there are no kernels to count)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() if cuda is None else cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.key_averages()
    if cuda:
        timed = [(e.key, e.count, e.self_device_time_total) for e in events
                 if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    else:
        timed = [(e.key, e.count, e.self_cpu_time_total) for e in events if e.self_cpu_time_total > 0]
    total_us = sum(t for _, _, t in timed)
    timed.sort(key=lambda x: -x[2])
    return {
        "profiled": "CUDA kernels" if cuda else "CPU operators (self time)",
        "calls": calls,
        "wall_ms_per_call": round(wall_us / calls / 1e3, 3),
        "busy_ms_per_call": round(total_us / calls / 1e3, 3),
        # kernels run one after another on one stream: what is left of the wall time is the device idle
        "busy_share": round(min(total_us / wall_us, 1.0), 3) if cuda and wall_us else None,
        "launches_per_call": round(sum(c for _, c, _ in timed) / calls, 1),
        "top": [{"name": name[:90], "per_call": round(count / calls, 1), "ms_per_call": round(t / calls / 1e3, 4),
                 "share": round(t / total_us, 3)} for name, count, t in timed[:top]],
    }


def show_profile(title: str, profile: dict) -> None:
    print(f"\n{title}: {profile['wall_ms_per_call']} ms per call, {profile['busy_ms_per_call']} ms in "
          f"{profile['launches_per_call']} {profile['profiled']}"
          + (f" (device busy {100 * profile['busy_share']:.0f}%)" if profile["busy_share"] is not None else ""))
    for k in profile["top"]:
        print(f"  {100 * k['share']:5.1f}%  {k['ms_per_call']:9.4f} ms  x{k['per_call']:<6}  {k['name']}")
