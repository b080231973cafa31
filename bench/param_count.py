"""Parameter counts of every teacher family at its published sizes (shapes from each config.json, written in
model/families/*.py), against the converted student with the family's default layout (Qwen2.5-VL and Qwen3-VL:
1 sliding-window attention : 3 Gated DeltaNet; Qwen3.5: its own Gated DeltaNet kept, its full attention made
sliding). Built on the meta device, so nothing is allocated.

    python -m bench.param_count
"""

from __future__ import annotations

import torch

from bench.common import print_table, write_result
from model import FAMILIES

GROUPS = ("vision", "embeddings+head", "attention", "linear", "mlp+norms")


def qwen2_5_vl_3b_config():
    """Qwen2.5-VL-3B-Instruct's published shapes (the paper's teacher)."""
    return FAMILIES["qwen2_5_vl"].published["3B"]()


def count(model, linear_layers: set[int]) -> dict:
    """Parameters by group; the token mixers of `linear_layers` count as "linear" (the teacher's own Gated
    DeltaNet included), other mixers as "attention"."""
    seen, groups = set(), dict.fromkeys(GROUPS, 0)
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue  # tied
        seen.add(id(p))
        if ".visual." in name:
            g = "vision"
        elif "embed_tokens" in name or "lm_head" in name:
            g = "embeddings+head"
        elif ".self_attn." in name or ".linear_attn." in name:
            layer = int(name.split("layers.")[1].split(".")[0])
            g = "linear" if layer in linear_layers else "attention"
        else:
            g = "mlp+norms"
        groups[g] += p.numel()
    groups["total"] = sum(groups.values())
    return groups


def sizes() -> list[dict]:
    rows = []
    for family in FAMILIES.values():
        for size, config in family.published.items():
            teacher_cfg = config()
            text = teacher_cfg.text_config
            teacher_linear = {i for i in range(text.num_hidden_layers)
                              if family.teacher_layer_kind(text, i) == "linear_attention"}
            with torch.device("meta"):
                teacher = family.teacher_class(teacher_cfg)
                student_cfg = family.config_class.from_teacher(teacher_cfg)
                student = family.model_class(student_cfg)
            student_linear = {i for i, t in enumerate(student_cfg.text_config.layer_types) if t == "linear_attention"}
            t, s = count(teacher, teacher_linear), count(student, student_linear)
            layout = f"{len(student_linear)} linear + {text.num_hidden_layers - len(student_linear)} sliding"
            rows.append({"family": family.name, "size": size, "model": "teacher", **t, "layout": f"{len(teacher_linear)}"
                         f" linear + {text.num_hidden_layers - len(teacher_linear)} full attention"})
            rows.append({"family": family.name, "size": size, "model": "student", **s, "layout": layout})
    return rows


def main() -> None:
    rows = sizes()
    print_table([{**r, **{k: f"{r[k] / 1e9:.3f}B" for k in (*GROUPS, "total")}} for r in rows])
    summary = {f"{r['family']} {r['size']} {r['model']}": round(r["total"] / 1e9, 3) for r in rows}
    for fam in FAMILIES.values():
        for size in fam.published:
            t, s = (summary[f"{fam.name} {size} {m}"] for m in ("teacher", "student"))
            print(f"{fam.name} {size}: teacher {t:.2f}B, student {s:.2f}B")
    write_result("param_count", {"students": "each family's default layout, linear mixer gated_deltanet, "
                                 "GDN dims from the teacher's attention (Qwen3.5: its own)"}, rows, summary)


if __name__ == "__main__":
    main()
