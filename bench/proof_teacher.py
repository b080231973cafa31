"""Train a small Qwen2.5-VL teacher on the synthetic picture tasks (first step of the transfer proof).

A distillation run only proves something if the teacher knows something, so this trains the tiny
Qwen2.5-VL (the real code path, small dimensions) on the sample-data generator's pictures until it
answers held-out questions above chance. It writes the teacher and processor in Hugging Face format to
`<out>/teacher/` (usable as `teacher.source`) and a JSON report to `<out>/report.json`.

    python -m bench.proof_teacher --out /tmp/proof [--steps N] [--hidden H] [--layers L]

The defaults fit a few CPU minutes; on a GPU scale up --steps, --hidden, --layers and --vision-hidden.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import defaultdict

import torch

from model.tiny import build_tiny_teacher
from pipeline.data.synthetic import PICTURES
from pipeline.eval.metrics import normalize_vqa_answer

# Every picture maker returns two questions in a fixed order; these name them for the per-kind report.
QUESTION_KINDS = {
    "shapes": ("shapes/count", "shapes/color"),
    "bar_chart": ("bar_chart/highest", "bar_chart/lowest"),
    "line_chart": ("line_chart/trend", "line_chart/last_value"),
    "text_line": ("text_line/read", "text_line/first_word"),
}
IGNORE = -100


# -- data -------------------------------------------------------------------------------------------------------
def make_samples(n_pictures: int, seed: int) -> list[dict]:
    """`n_pictures` pictures (the makers take turns), one sample per question: image, question, answer, kind."""
    rng = random.Random(seed)
    samples = []
    for i in range(n_pictures):
        maker = PICTURES[i % len(PICTURES)]
        image, qa = maker(rng)
        for kind, (question, answer) in zip(QUESTION_KINDS[maker.__name__], qa):
            samples.append({"image": image, "question": question, "answer": answer, "kind": kind})
    return samples


def prompt_text(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def training_batch(processor, samples: list[dict], max_pixels: int) -> dict:
    """Prompt + answer + end-of-turn, right-padded, with labels only on the answer and end-of-turn tokens.

    The template ends the prompt with "assistant\\n", and the tokenizer splits at newlines and special
    tokens, so the answer tokenizes the same alone as after the prompt; the check below makes sure.
    """
    eos = processor.tokenizer.eos_token
    texts = [prompt_text(processor, s["question"]) + s["answer"] + eos for s in samples]
    batch = processor(text=texts, images=[s["image"] for s in samples], max_pixels=max_pixels, padding_side="right")
    labels = torch.full_like(batch["input_ids"], IGNORE)
    for row, s in enumerate(samples):
        answer_ids = processor.tokenizer(s["answer"] + eos, add_special_tokens=False)["input_ids"]
        end = int(batch["attention_mask"][row].sum())
        if batch["input_ids"][row, end - len(answer_ids):end].tolist() != answer_ids:
            raise ValueError(f"answer {s['answer']!r} tokenizes differently after the prompt")
        labels[row, end - len(answer_ids):end] = batch["input_ids"][row, end - len(answer_ids):end]
    batch["labels"] = labels
    return batch


# -- training ---------------------------------------------------------------------------------------------------
def train(model, processor, samples: list[dict], steps: int, batch_size: int = 16, lr: float = 1e-3,
          max_pixels: int = 28 * 28 * 16, log_every: int = 20, seed: int = 0, device: str = "cpu") -> list[dict]:
    """AdamW on answer-token cross-entropy over random batches; returns the loss curve (one point per log)."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    # a short linear warm-up: from-scratch attention is unstable at full learning rate in the first steps
    warmup = max(1, min(100, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    rng = random.Random(seed)
    curve, window, start = [], [], time.time()
    for step in range(1, steps + 1):
        batch = training_batch(processor, rng.sample(samples, min(batch_size, len(samples))), max_pixels)
        loss = model(**batch.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if step % log_every == 0 or step == steps:
            mean = sum(window) / len(window)
            curve.append({"step": step, "loss": mean})
            print(f"step {step}/{steps}  loss {mean:.4f}  {time.time() - start:.0f}s", flush=True)
            window = []
    model.eval()
    return curve


# -- evaluation -------------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model, processor, samples: list[dict], batch_size: int = 32, max_pixels: int = 28 * 28 * 16,
            device: str = "cpu") -> list[str]:
    """Greedy answers, up to 8 new tokens, with left padding so every row generates from its last token."""
    model.eval()
    answers = []
    for k in range(0, len(samples), batch_size):
        chunk = samples[k:k + batch_size]
        batch = processor(text=[prompt_text(processor, s["question"]) for s in chunk],
                          images=[s["image"] for s in chunk], max_pixels=max_pixels, padding_side="left")
        out = model.generate(**batch.to(device), max_new_tokens=8, do_sample=False)
        answers += processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def accuracy_by_kind(predictions: list[str], samples: list[dict]) -> dict[str, float]:
    """Exact match after the EvalAI normalisation (case, punctuation, number words), per kind and overall."""
    hits = defaultdict(list)
    for prediction, s in zip(predictions, samples):
        hit = float(normalize_vqa_answer(prediction) == normalize_vqa_answer(s["answer"]))
        hits[s["kind"]].append(hit)
        hits["all"].append(hit)
    return {kind: sum(v) / len(v) for kind, v in sorted(hits.items())}


# -- the recipe -------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train_samples = make_samples(args.train_pictures, seed=args.seed)
    held_out = make_samples(args.eval_pictures, seed=args.seed + 1000)  # another seed: unseen pictures
    model, processor = build_tiny_teacher(
        args.seed, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, intermediate=args.intermediate,
        num_layers=args.layers, vision_hidden=args.vision_hidden, vision_depth=args.vision_depth)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"teacher: {n_params / 1e6:.2f}M parameters; {len(train_samples)} train / {len(held_out)} held-out "
          f"questions on {device}", flush=True)

    start = time.time()
    curve = train(model, processor, train_samples, args.steps, args.batch_size, args.lr, args.max_pixels,
                  args.log_every, args.seed, device)
    train_seconds = time.time() - start
    accuracy = accuracy_by_kind(predict(model, processor, held_out, max_pixels=args.max_pixels, device=device),
                                held_out)
    for kind, acc in accuracy.items():
        print(f"held-out accuracy  {kind:24s} {acc:.3f}")

    teacher_dir = os.path.join(args.out, "teacher")
    model.to("cpu").save_pretrained(teacher_dir)
    processor.save_pretrained(teacher_dir)
    report = {"config": vars(args), "device": device, "parameters": n_params, "steps": args.steps,
              "train_seconds": round(train_seconds, 1), "loss_curve": curve, "held_out_accuracy": accuracy,
              "held_out_questions": len(held_out), "teacher_dir": teacher_dir}
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"teacher saved to {teacher_dir}; report in {os.path.join(args.out, 'report.json')}")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for teacher/ and report.json")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vision-hidden", type=int, default=64)
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--max-pixels", type=int, default=28 * 28 * 16,
                   help="image size cap; 28*28*16 gives at most 16 image tokens per picture")
    p.add_argument("--train-pictures", type=int, default=4000)
    p.add_argument("--eval-pictures", type=int, default=128)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
