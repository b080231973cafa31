"""The proof teacher's recipe: it learns, it saves as a loadable Hugging Face teacher, it scores answers."""

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from bench.proof_teacher import accuracy_by_kind, make_samples, train, training_batch
from model.processing import InfiniteVLProcessor
from model.tiny import build_tiny_teacher


def test_teacher_trains_saves_reloads_and_scores(tmp_path, one_thread):
    model, processor = build_tiny_teacher(0, hidden=32, intermediate=64, num_layers=2, vision_hidden=32,
                                          vision_depth=1)
    samples = make_samples(4, seed=0)  # one picture of each kind, two questions each
    assert {s["kind"].split("/")[0] for s in samples} == {"shapes", "bar_chart", "line_chart", "text_line"}

    # the same eight questions every step: the loss must fall
    curve = train(model, processor, samples, steps=6, batch_size=len(samples), lr=3e-3, log_every=1)
    assert curve[-1]["loss"] < curve[0]["loss"]

    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    batch = training_batch(processor, samples[:2], max_pixels=28 * 28 * 16)
    batch_reloaded = training_batch(InfiniteVLProcessor.from_pretrained(str(tmp_path)), samples[:2],
                                    max_pixels=28 * 28 * 16)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch_reloaded).logits)

    answers = [{"answer": "three", "kind": "shapes/count"}, {"answer": "red", "kind": "shapes/color"}]
    assert accuracy_by_kind(["Three.", " red"], answers) == {"all": 1.0, "shapes/color": 1.0, "shapes/count": 1.0}
    assert accuracy_by_kind(["four", "blue"], answers) == {"all": 0.0, "shapes/color": 0.0, "shapes/count": 0.0}
