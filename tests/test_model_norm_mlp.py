"""The decoder's RMSNorm and MLP against transformers' Qwen2.5-VL modules: exactly on the torch path, within
bf16 rounding on CUDA where fla's fused kernels run (forward and gradients, the residual add included)."""

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm, Qwen2MLP

from model.config import InfiniteVLTextConfig
from model.norm_mlp import RMSNorm, SwiGLUMLP


def _pair(device, dtype, hidden=256):
    torch.manual_seed(0)
    ref = Qwen2_5_VLRMSNorm(hidden, eps=1e-6).to(device)
    ref.weight.data.normal_(1.0, 0.3)
    ours = RMSNorm(hidden, eps=1e-6).to(device, dtype)
    ours.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
    return ref, ours


def test_rms_norm_with_residual_equals_transformers_norm_of_the_sum():
    ref, ours = _pair("cpu", torch.float32)
    x, res = torch.randn(2, 7, 256), torch.randn(2, 7, 256)
    normed, total = ours(x, res)
    torch.testing.assert_close(total, x + res, atol=0, rtol=0)
    torch.testing.assert_close(normed, ref(x + res), atol=0, rtol=0)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)


def test_mlp_equals_transformers_mlp():
    cfg = InfiniteVLTextConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                               num_hidden_layers=1, vocab_size=32)
    torch.manual_seed(0)
    ref = Qwen2MLP(cfg)
    ours = SwiGLUMLP(cfg)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=0, rtol=0)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
def test_fused_norm_and_mlp_on_gpu_match_fp32_reference():
    ref, ours = _pair("cuda", torch.bfloat16, hidden=2048)
    x = torch.randn(3, 300, 2048, device="cuda")
    res = torch.randn(3, 300, 2048, device="cuda")
    xr, rr = x.clone().requires_grad_(), res.clone().requires_grad_()
    xf, rf = x.bfloat16().requires_grad_(), res.bfloat16().requires_grad_()
    dy, dh = torch.randn_like(x), torch.randn_like(x)
    yr, hr = ref(xr + rr), xr + rr
    yf, hf = ours(xf, rf)
    ((yr * dy).sum() + (hr * dh).sum()).backward()
    ((yf.float() * dy).sum() + (hf.float() * dh).sum()).backward()
    errors = {"y": _rel(yf, yr), "h": _rel(hf, hr), "dx": _rel(xf.grad, xr.grad), "dres": _rel(rf.grad, rr.grad),
              "dw": _rel(ours.weight.grad, ref.weight.grad)}

    cfg = InfiniteVLTextConfig(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
                               num_hidden_layers=1, vocab_size=32)
    mr = Qwen2MLP(cfg).cuda()
    mf = SwiGLUMLP(cfg).cuda().bfloat16()
    mf.load_state_dict({k: v.bfloat16() for k, v in mr.state_dict().items()})
    z = torch.randn(2, 200, 512, device="cuda")
    zr, zf = z.clone().requires_grad_(), z.bfloat16().requires_grad_()
    dz = torch.randn(2, 200, 512, device="cuda")
    (mr(zr) * dz).sum().backward()
    out = mf(zf)
    (out.float() * dz).sum().backward()
    errors.update({"mlp": _rel(out, mr(z)), "mlp dx": _rel(zf.grad, zr.grad),
                   "mlp dgate": _rel(mf.gate_proj.weight.grad, mr.gate_proj.weight.grad)})
    print("fused (bf16) vs fp32:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < 2e-2, errors


def test_vision_tower_gets_the_fused_modules_with_its_weights_and_arithmetic(tiny_teacher, tiny_student):
    """The student's vision tower: the teacher's parameters under the same names, our forward classes, and
    on the torch path the same features for the same pixels."""
    from model.norm_mlp import RMSNorm, VisionSwiGLUMLP

    visual, ref = tiny_student.model.visual, tiny_teacher[0].model.visual
    assert {n for n, _ in visual.named_parameters()} == {n for n, _ in ref.named_parameters()}
    kinds = {type(m) for m in visual.modules()}
    assert RMSNorm in kinds and VisionSwiGLUMLP in kinds
    grid = torch.tensor([[1, 4, 4]])
    torch.manual_seed(0)
    pixels = torch.randn(16, ref.config.in_channels * ref.config.temporal_patch_size * ref.config.patch_size ** 2)
    with torch.no_grad():
        torch.testing.assert_close(visual(pixels, grid_thw=grid).pooler_output,
                                   ref(pixels, grid_thw=grid).pooler_output, atol=0, rtol=0)
