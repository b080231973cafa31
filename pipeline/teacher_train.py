"""Training the tiny teacher on the synthetic picture questions (the run config's `teacher.train`).

A distillation run only proves something if the teacher knows something. This trains the in-code tiny teacher
of a family (Qwen2.5-VL by default; the real transformers code path, small dimensions) on the sample-data
generator's pictures: count the shapes and name their color, the highest and lowest bar, the line's trend and
last value, the text line and its first word. It then scores the teacher on the held-out `pictures` eval suite,
the same suite (same prompts, same greedy decoding, same exact-match scoring) the eval stage scores students on.

Why the pictures are shown at the processor's own resolution (up to 28·28·64 pixels): at 28·28·16 the
320×64 text line becomes a 224×28 image, glyphs about 5 pixels tall, and text reading stays at chance
however long the teacher trains. The prompt is the eval runner's (`build_prompt`: the question plus the
"single word or phrase" instruction), so there is no format gap between what is trained and what is scored.

Training pictures are drawn fresh for every batch (no picture is seen twice, so the teacher cannot
memorise), from seeds below `HELD_OUT_SEED`; the batches are the same whatever the number of loader
processes. With `target_accuracy`, training stops once the teacher-forced exact match on a validation set
(which, for greedy decoding, is the exact match of the generated answer) reaches it.
"""

from __future__ import annotations

import io
import math
import tempfile
import time
from typing import Callable

import torch

from model.cuda_graphs import grouped_vision
from pipeline import storage
from pipeline.eval.mechanisms import length_octave
from pipeline.eval.runner import EvalConfig, build_messages, build_prompt, run_suite
from pipeline.eval.synthetic import HELD_OUT_SEED, picture_samples

IGNORE = -100
VALIDATION_SEED = HELD_OUT_SEED + 1  # neither a training seed (those stay below HELD_OUT_SEED) nor the held-out one
VALIDATION_PICTURES = 32


# -- batches ----------------------------------------------------------------------------------------------------
def prompt_text(processor, sample: dict) -> str:
    """The eval runner's prompt for a sample, through the chat template, ending with the assistant header."""
    return processor.apply_chat_template(build_messages(sample, build_prompt(sample)), add_generation_prompt=True)


def training_batch(processor, samples: list[dict]) -> dict:
    """Prompt + answer + end-of-turn, right-padded, with labels only on the answer and end-of-turn tokens.

    The template ends the prompt with "assistant\\n" and the tokenizer splits at newlines and special
    tokens, so the answer tokenizes the same alone as after the prompt; the check below makes sure.
    """
    eos = processor.tokenizer.eos_token
    texts = [prompt_text(processor, s) + s["answers"][0] + eos for s in samples]
    images = [s["image"] for s in samples if s.get("image") is not None]
    videos = [s["frames"] for s in samples if s.get("frames")]  # the recall kind's frame streams
    batch = processor(text=texts, images=images or None, videos=videos or None,
                      video_fps=[s["video_fps"] for s in samples if s.get("frames")] or 2.0, padding_side="right")
    labels = torch.full_like(batch["input_ids"], IGNORE)
    for row, s in enumerate(samples):
        answer_ids = processor.tokenizer(s["answers"][0] + eos, add_special_tokens=False)["input_ids"]
        end = int(batch["attention_mask"][row].sum())
        if batch["input_ids"][row, end - len(answer_ids):end].tolist() != answer_ids:
            raise ValueError(f"answer {s['answers'][0]!r} tokenizes differently after the prompt")
        labels[row, end - len(answer_ids):end] = batch["input_ids"][row, end - len(answer_ids):end]
    batch["labels"] = labels
    return dict(batch)


def batch_seed(seed: int, index: int) -> int:
    """The picture seed of training batch `index`: below HELD_OUT_SEED, so never a held-out picture."""
    return (seed * 7919 + index) % HELD_OUT_SEED


class PictureBatches(torch.utils.data.IterableDataset):
    """Endless training batches of fresh pictures (`batch_size` questions, both questions of each picture);
    loader process w of W makes batches w, w+W, ..., which the DataLoader hands out in index order. The recall
    streams of one batch are of one octave of lengths (pipeline/eval/mechanisms.py `length_octave`): a batch
    pads to its longest row, and streams of 4 to 1024 frames drawn together would make most of it padding."""

    def __init__(self, processor, batch_size: int, seed: int, start: int = 0, kinds=None, max_frames: int = 64):
        self.processor, self.batch_size, self.seed, self.start, self.kinds = processor, batch_size, seed, start, kinds
        self.max_frames = max_frames

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        index = self.start + worker
        while True:
            low, high = length_octave(index, self.seed, self.max_frames)
            samples = picture_samples(math.ceil(self.batch_size / 2), batch_seed(self.seed, index), images_as="pil",
                                      kinds=self.kinds, max_frames=high, min_frames=low)
            yield training_batch(self.processor, samples[:self.batch_size])
            index += workers


# -- training ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def teacher_forced_exact(model, batch: dict) -> torch.Tensor:
    """Per row: 1 when every answer token (and the end of turn) is the argmax given the tokens before it,
    which is exactly when greedy decoding generates the answer."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"][:, 1:]
    right = (logits[:, :-1].argmax(-1) == labels) | (labels == IGNORE)
    return right.all(dim=1).float()


def forward_backward(model, batch: dict, autocast) -> torch.Tensor:
    """The batch's loss, its gradients accumulated into the parameters."""
    # the vision tower's windows in a few SDPA calls, one per window size: transformers launches one per
    # window, with a host sync per block, and a batch of long recall streams has tens of thousands
    with autocast, grouped_vision(model):
        loss = model(**batch).loss
    loss.backward()
    return loss


def lr_factor(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine down to `floor` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_teacher(settings, seed: int = 0, family: str = "qwen2_5_vl"):
    """The untrained tiny teacher of `family` (model/families/) with the dims of `settings` (a
    `TeacherTrainSection`), on its device in training mode: (model, processor, device, autocast)."""
    from model.tiny import build_processor, build_tiny_teacher

    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, processor = build_tiny_teacher(
        seed, processor=build_processor(max_pixels=settings.max_pixels, family=family), family=family,
        hidden=settings.hidden, heads=settings.heads, kv_heads=settings.kv_heads, intermediate=settings.intermediate,
        num_layers=settings.num_layers, vision_hidden=settings.vision_hidden, vision_depth=settings.vision_depth)
    model.to(device).train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16")
    return model, processor, device, autocast


class TrainingState:
    """Where a teacher training keeps what it needs to go on after a kill: one file (model, optimizer, schedule,
    step, curve, seconds trained), written whole through the storage layer, so it is the last one saved or none."""

    def __init__(self, url: str):
        self.url = url

    def load(self) -> dict | None:
        if not storage.exists(self.url):
            return None
        try:
            return torch.load(io.BytesIO(storage.read_bytes(self.url)), map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable state is the same problem to the user
            raise RuntimeError(f"{self.url}: the teacher's saved training state cannot be read "
                               f"({type(exc).__name__}: {exc}); delete it to train the teacher from the start") from exc

    def save(self, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        storage.write_bytes(self.url, buffer.getvalue())

    def clear(self) -> None:
        if storage.exists(self.url):
            storage.delete(self.url)


def train_teacher(settings, seed: int = 0, log: Callable[[str], None] = print, family: str = "qwen2_5_vl",
                  state: TrainingState | None = None):
    """Builds the tiny teacher of `family` (model/families/) with the dims of `settings` (a
    `TeacherTrainSection`), trains it, scores it on the held-out pictures. Returns (model on the CPU in fp32,
    processor, metrics). With `state`, the training saves itself there every `settings.checkpoint_seconds` and at
    its end, and a training found there goes on from its step, exactly: the batches are a function of the step, and
    `max_seconds` counts the seconds trained before the kill."""
    from model.tiny import build_processor

    model, processor, device, autocast = build_teacher(settings, seed, family)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, settings.steps, settings.warmup_steps, settings.min_lr_ratio))
    curve, window, tokens, validation_acc, waited, trained_s, first = [], [], 0, None, 0.0, 0.0, 0
    saved = state.load() if state is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        first, curve, window, tokens = saved["step"], saved["curve"], saved["window"], saved["tokens"]
        validation_acc, waited, trained_s = saved["validation_exact"], saved["waited"], saved["seconds"]
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], device)
        log(f"teacher: going on from step {first} ({trained_s:.0f} s trained), saved in {state.url}")
    kinds = settings.pictures
    loader = torch.utils.data.DataLoader(PictureBatches(processor, settings.batch_size, seed, start=first, kinds=kinds,
                                                        max_frames=settings.max_frames),
                                         batch_size=None,
                                         num_workers=settings.loader_workers,
                                         prefetch_factor=4 if settings.loader_workers else None)
    validation = to_device(training_batch(processor, picture_samples(VALIDATION_PICTURES, VALIDATION_SEED, "pil",
                                                                     kinds, settings.max_frames)), device)
    check_every = max(25, settings.steps // 20)
    log(f"teacher: {n_params / 1e6:.2f}M parameters, training {settings.steps} steps of {settings.batch_size} "
        f"questions on {device} ({settings.precision})")

    start = time.time() - trained_s
    step, ready, saved_at = first, time.time(), time.time()

    def save(done: bool = False) -> None:
        state.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "step": step, "curve": curve, "window": window,
                    "tokens": tokens, "validation_exact": validation_acc,
                    "waited": waited, "seconds": time.time() - start, "done": done, "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None})

    finished = bool(saved and saved.get("done"))
    for step, batch in enumerate(() if finished else loader, start=first + 1):
        waited += time.time() - ready  # time the step stood waiting for its batch: the loader is the bottleneck
        batch = to_device(batch, device)
        tokens += int(batch["attention_mask"].sum())
        optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(model, batch, autocast)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        last = step == settings.steps or (settings.max_seconds and time.time() - start > settings.max_seconds)
        if step % check_every == 0 or last:
            model.eval()
            with autocast, grouped_vision(model):
                validation_acc = float(teacher_forced_exact(model, validation).mean())
            model.train()
            elapsed = time.time() - start
            curve.append({"step": step, "loss": sum(window) / len(window), "validation_exact": validation_acc,
                          "lr": schedule.get_last_lr()[0], "seconds": round(elapsed, 1),
                          "loader_wait": round(waited / elapsed, 3)})
            window = []
            log(f"teacher step {step}/{settings.steps}  loss {curve[-1]['loss']:.4f}  lr {curve[-1]['lr']:.3g}  "
                f"validation exact match "
                f"{validation_acc:.3f}  {elapsed:.0f}s ({step / elapsed:.1f} steps/s, {100 * waited / elapsed:.0f}% "
                f"waiting for batches)")
            if settings.target_accuracy and validation_acc >= settings.target_accuracy:
                log(f"teacher reached the target validation accuracy {settings.target_accuracy} at step {step}")
                last = True
        if last:
            break
        if state is not None and time.time() - saved_at >= settings.checkpoint_seconds:
            save()
            saved_at = time.time()
        ready = time.time()
    if state is not None and not finished:
        save(done=True)  # the end too: a kill while scoring or publishing does not train it again
    train_seconds = time.time() - start
    model.eval()
    with autocast:
        held_out = score_pictures(model, processor, settings.eval_pictures, kinds=kinds, max_frames=settings.max_frames)
    log(f"teacher held-out accuracy {held_out['pictures']:.1f}% on {2 * settings.eval_pictures} questions: "
        + ", ".join(f"{k} {v:.0f}" for k, v in held_out.items() if k != "pictures"))
    metrics = {"parameters": n_params, "steps": step, "train_seconds": round(train_seconds, 1),
               "train_tokens": tokens, "loss": curve[-1]["loss"] if curve else None,
               "validation_exact": validation_acc, "score": held_out["pictures"],
               **{f"heldout/{k}": v for k, v in held_out.items()}, "loss_curve": curve}
    # a fresh processor to save: batched calls leave padding settings in the used one's tokenizer, which would
    # change its fingerprint (the data and training stages compare the shards' processor with the teacher's)
    return model.to("cpu").float(), build_processor(max_pixels=settings.max_pixels, family=family), metrics


def score_pictures(model, processor, n_pictures: int = 64, out_dir: str | None = None,
                   batch_size: int = 32, kinds=None, max_frames: int = 64) -> dict[str, float]:
    """Held-out accuracy in percent, overall (`pictures`) and per kind of question, through the eval runner."""
    config = EvalConfig(batch_size=batch_size, max_new_tokens=16)
    with tempfile.TemporaryDirectory(prefix="infinitevl-pictures-") as tmp:
        results = run_suite(model, processor, picture_samples(n_pictures, kinds=kinds, max_frames=max_frames),
                            "pictures", out_dir or tmp,
                            config)
    return {"pictures": results["score"], **{k: v["score"] for k, v in results.get("categories", {}).items()}}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
