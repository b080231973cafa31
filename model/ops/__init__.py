"""The recurrences and kernels under the linear mixers, in the manner of flash-linear-attention's `fla.ops`:
each op has an exact torch implementation (the CPU path and the tests' reference) beside its dispatch to fla's
Triton kernels on CUDA (`common.use_fla` decides), and `testing.compare_with_reference` compares the two.

- `delta_rule.py`: the gated delta rule (Gated DeltaNet), scalar decay per head, grouped value heads.
- `kda.py`: Kimi Delta Attention, the gated delta rule with per-channel decay.
- `gla.py`: gated linear attention, per-channel (GLA) or scalar (Mamba2's SSD form) decay.
- `conv.py`: the short causal conv + SiLU; `norm.py`: the gated RMSNorm at the mixers' output.
"""
