"""Parameter count of the converted full-size student (Qwen2.5-VL-3B shapes, random weights, built on the
meta device, so nothing is allocated), against its teacher.

    python -m bench.param_count
"""

from __future__ import annotations

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from bench.common import print_table, write_result
from model import InfiniteVLConfig, InfiniteVLForConditionalGeneration


def qwen2_5_vl_3b_config() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-3B-Instruct's published shapes."""
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                         rope_theta=1e6, tie_word_embeddings=True),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
        tie_word_embeddings=True)


def count(model) -> dict:
    seen, groups = set(), {"vision": 0, "embeddings+head": 0, "attention": 0, "gated_deltanet": 0, "mlp+norms": 0}
    types = model.config.text_config.layer_types if hasattr(model.config.text_config, "layer_types") else None
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue  # tied
        seen.add(id(p))
        if ".visual." in name:
            g = "vision"
        elif "embed_tokens" in name or "lm_head" in name:
            g = "embeddings+head"
        elif ".self_attn." in name:
            layer = int(name.split("layers.")[1].split(".")[0])
            g = "gated_deltanet" if types and types[layer] == "linear_attention" else "attention"
        else:
            g = "mlp+norms"
        groups[g] += p.numel()
    groups["total"] = sum(groups.values())
    return groups


def main() -> None:
    teacher_cfg = qwen2_5_vl_3b_config()
    with torch.device("meta"):
        teacher = Qwen2_5_VLForConditionalGeneration(teacher_cfg)
        student = InfiniteVLForConditionalGeneration(InfiniteVLConfig.from_teacher(teacher_cfg))
    rows = [{"model": "Qwen2.5-VL-3B (teacher)", **count(teacher)}, {"model": "InfiniteVL (student)", **count(student)}]
    print_table(rows)
    s = rows[1]["total"]
    print(f"student: {s / 1e9:.2f}B parameters ({rows[1]['gated_deltanet'] / 1e6:.0f}M in 27 Gated DeltaNet mixers, "
          f"{rows[1]['attention'] / 1e6:.0f}M in 9 sliding-window attentions); the paper's '4B' class")
    t = student.config.text_config
    write_result("param_count", {"teacher": "Qwen2.5-VL-3B shapes", "layer_types": "1 sliding : 3 GDN",
                                 "gdn": f"{t.num_linear_heads} heads x {t.linear_head_dim}, expand_v {t.expand_v}"},
                 rows, {"student_params_b": round(s / 1e9, 3), "teacher_params_b": round(rows[0]["total"] / 1e9, 3)})


if __name__ == "__main__":
    main()
