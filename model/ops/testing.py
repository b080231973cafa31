"""One way to compare an fla kernel with its exact torch reference: the same inputs, the kernel in reduced
precision, the reference in fp32, the same random cotangents; relative errors of the output, the final state and
every input's gradient. Used by the GPU tests and by the Hopper-guard gradient checks."""

from __future__ import annotations

import torch


def compare_with_reference(kernel, reference, inputs: dict, device, dtype=torch.bfloat16, fp32=("g",), seed=0,
                           kernel_names: dict | None = None, backward: bool = True, **kwargs) -> dict[str, float]:
    """Relative error (max |a − b| / max |b|) of `kernel(**inputs, **kwargs)` (inputs in `dtype` on `device`,
    those named in `fp32` kept in fp32) against `reference(**inputs, **kwargs)` (all fp32 on `device`), for the
    output `o`, the final state `ht` (when `output_final_state=True`) and, with `backward` (kernels that have
    one), `d<name>` for every input.
    `kernel_names` renames inputs for the kernel (fla's fused_recurrent_gla calls the gate `gk`). Tensor
    keyword arguments (initial_state, cu_seqlens) move to `device`; states stay fp32, as fla wants them."""
    kwargs = {n: (v.to(device) if isinstance(v, torch.Tensor) else v) for n, v in kwargs.items()}
    gen = torch.Generator().manual_seed(seed)
    cotangents: dict[str, torch.Tensor] = {}

    def run(fn, in_dtype, names):
        xs = {n: x.to(device, torch.float32 if n in fp32 else in_dtype).detach().requires_grad_(backward)
              for n, x in inputs.items()}
        with torch.set_grad_enabled(backward):
            o, ht = fn(**{names.get(n, n): x for n, x in xs.items()}, **kwargs)
        outs = {"o": o} if ht is None else {"o": o, "ht": ht}
        result = {n: t.detach().float().cpu() for n, t in outs.items()}
        if backward:
            for n, t in outs.items():
                if n not in cotangents:
                    cotangents[n] = torch.randn(t.shape, generator=gen)
            sum((t.float() * cotangents[n].to(device)).sum() for n, t in outs.items()).backward()
            result.update({f"d{n}": x.grad.float().cpu() for n, x in xs.items()})
        return result

    ref = run(reference, torch.float32, {})
    got = run(kernel, dtype, kernel_names or {})
    return {n: float((got[n] - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-12)) for n in ref}
