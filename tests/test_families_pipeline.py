"""Every teacher family through the pipeline: its processor's tokens and positions in the data stage and the
loader, its teacher on packed rows (teacher logits, Stage I-a), its student built, trained, exported, scored,
answering and streaming; and the tiny pipeline run end to end once per family.

References: transformers' own models and rules (each document run alone through the teacher's own forward, its
`get_rope_index` through model.positions, its Qwen3VLProcessor's video placeholders), and the processor's own
path for the same conversation.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import FAMILIES, family_names
from model.positions import rope_index
from model.tiny import build_tiny_teacher, tiny_teacher_config
from pipeline.data import synthetic
from pipeline.data.config import CorpusConfig, SourceConfig
from pipeline.data.loader import example_from_row
from pipeline.data.shards import pack_row
from pipeline.data.sources import read_record
from pipeline.data.tokenize import _messages, check_turns, load_processor, tokenize_record
from pipeline.packed_teacher import PackedTeacher, packed_model_inputs

REPO = Path(__file__).resolve().parents[1]
FAMILY_NAMES = family_names()


@functools.lru_cache(maxsize=None)
def tiny(family: str):
    """(teacher, processor): the family's tiny teacher, fp32, eval mode."""
    return build_tiny_teacher(seed=0, family=family)


def frames(n: int, seed: int, size: int = 64) -> list[Image.Image]:
    rs = np.random.RandomState(seed)
    return [Image.fromarray((rs.rand(size, size, 3) * 255).astype("uint8")) for _ in range(n)]


def documents(processor) -> list[dict]:
    """Three documents as the processor makes them: an image and a question, a video of 4 frames (2 temporal
    patches) and a question, text alone."""
    def doc(content, **media):
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        return dict(processor([text], **media))

    return [doc([{"type": "image"}, {"type": "text", "text": "how many circles are there?"}], images=frames(1, 0)),
            doc([{"type": "video"}, {"type": "text", "text": "which object appeared?"}], videos=[frames(4, 1)],
                video_fps=2.0),
            doc("describe the scene")]


def packed_row(config, docs: list[dict]) -> dict:
    """The documents as one packed row, M-RoPE positions from the teacher's own rule for each document alone."""
    row = {"input_ids": torch.cat([d["input_ids"] for d in docs], 1),
           "mm_token_type_ids": torch.cat([d["mm_token_type_ids"] for d in docs], 1),
           "cu_seqlens": torch.tensor(np.cumsum([0] + [d["input_ids"].shape[1] for d in docs]), dtype=torch.int32),
           "position_ids": torch.cat([rope_index(config, d["input_ids"], d.get("image_grid_thw"), d.get("video_grid_thw"),
                                                 d.get("second_per_grid_ts"))[0] for d in docs], -1)}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        parts = [d[key] for d in docs if key in d]
        if parts:
            row[key] = torch.cat(parts)
    return row


def alone(teacher, docs: list[dict]) -> torch.Tensor:
    """Each document through the teacher's own forward (its own positions), the hidden states concatenated."""
    with torch.no_grad():
        return torch.cat([teacher.model(**{k: v for k, v in d.items() if k != "attention_mask"}).last_hidden_state
                          for d in docs], 1)


# -- the teacher on packed rows ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_packed_rows_give_each_document_what_the_teacher_gives_it_alone(family, one_thread):
    """The teacher as the teacher-logit stage and Stage I-a run it equals each document run alone through
    transformers' own model; and `packs_rows` is right: where it is off (Qwen3.5), the teacher's own forward on
    the packed row lets later documents read earlier ones."""
    teacher, processor = tiny(family)
    docs = documents(processor)
    row = packed_row(teacher.config, docs)
    reference = alone(teacher, docs)
    packed = PackedTeacher(teacher)
    assert packed.takes_boundaries == (not FAMILIES[family].packs_rows)
    with torch.no_grad():
        torch.testing.assert_close(packed.hidden_states(row), reference, atol=1e-4, rtol=1e-4)
        own = teacher.model(**packed_model_inputs(row, False), use_cache=False).last_hidden_state
    first = docs[0]["input_ids"].shape[1]
    torch.testing.assert_close(own[:, :first], reference[:, :first], atol=1e-4, rtol=1e-4)  # nothing before it
    leaked = (own[:, first:] - reference[:, first:]).abs().max().item()
    assert (leaked < 1e-4) == FAMILIES[family].packs_rows, leaked


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_stored_teacher_logits_read_the_teachers_distribution_of_each_document(family, one_thread):
    """The teacher-logit stage's top-k over loader examples (one document each here, concatenated as the stage
    concatenates rows) against the teacher's own log-probs on each document alone: Qwen3.5's through its exact
    student."""
    from pipeline.teacher_logits.teacher import Teacher, sparse_logits

    teacher, processor = tiny(family)
    docs = documents(processor)
    examples = [packed_row(teacher.config, [d]) for d in docs]
    packed = PackedTeacher(teacher)
    runner = Teacher(packed.model, processor, "tiny", "", packed.takes_boundaries)
    inputs = runner.inputs(examples)
    everywhere = torch.arange(inputs["input_ids"].shape[1])
    idx, lp, _ = sparse_logits(runner.model, inputs, everywhere, k=4, chunk=16)
    with torch.no_grad():
        reference = torch.cat([torch.log_softmax(teacher(**{k: v for k, v in d.items() if k != "attention_mask"})
                                                 .logits[0].float(), -1) for d in docs])
    torch.testing.assert_close(lp, reference.topk(4).values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lp, reference.gather(1, idx), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_packed_rows_and_stage1a_on_the_gpu_in_bf16(family):
    """As on the CPU, with the kernels a GPU run uses (fla's chunked recurrences, flash or flex attention): the
    packed row within bf16 of each document alone through the teacher's own forward, and Stage I-a's step
    (forward and backward) finite, a layer the teacher had linear starting at loss 0."""
    import inspect

    from pipeline.config import StudentSection
    from pipeline.train.objectives import LayerwiseAligner, student_config

    dims = {"hidden": 256, "heads": 4, "kv_heads": 2, "intermediate": 512, "head_dim": 64, "linear_head_dim": 64}
    accepted = inspect.signature(FAMILIES[family].tiny_config).parameters
    teacher, processor = build_tiny_teacher(seed=0, family=family, **{k: v for k, v in dims.items() if k in accepted})
    teacher = teacher.to("cuda", torch.bfloat16)
    docs = [{k: v.to("cuda") if torch.is_tensor(v) else v for k, v in d.items()} for d in documents(processor)]
    docs = [{k: v.to(torch.bfloat16) if torch.is_floating_point(v) and "pixel" in k else v for k, v in d.items()}
            for d in docs]
    row = packed_row(teacher.config, docs)
    reference = alone(teacher, docs).float()
    with torch.no_grad():
        hidden = PackedTeacher(teacher).hidden_states(row).float()
    assert ((hidden - reference).norm() / reference.norm()).item() < 2e-2
    n = teacher.config.text_config.num_hidden_layers
    config = student_config(teacher.config, StudentSection(sliding_window=64, layer_types=["linear_attention"] * n))
    aligner = LayerwiseAligner(teacher, config, loss_scale=1.0).cuda()
    loss, metrics = aligner(row)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all()
                                        for p in aligner.mixers.parameters() if p.requires_grad)
    kinds = [FAMILIES[family].teacher_layer_kind(teacher.config.text_config, i) for i in range(n)]
    losses = {kinds[i]: [] for i in aligner.linear_layers}
    for i, layer_loss in zip(aligner.linear_layers, aligner._losses):
        losses[kinds[i]].append(float(layer_loss.detach()))
    assert min(losses["attention"]) > 0
    assert max(losses.get("linear_attention", [0.0])) <= 1e-3 * min(losses["attention"]), losses


# -- Stage I-a ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_stage1a_regresses_each_linear_layer_onto_its_teacher_layers_output(family, one_thread):
    """Every layer made linear: its mixer is fed, and regressed onto, what the teacher's own layer (attention,
    or Qwen3.5's Gated DeltaNet) takes and gives on the document; a layer the teacher already had linear starts
    as that layer (loss 0), one converted from attention does not."""
    from pipeline.config import StudentSection
    from pipeline.train.objectives import LayerwiseAligner, student_config

    from model import teacher_mixer

    teacher, processor = tiny(family)
    n = teacher.config.text_config.num_hidden_layers
    config = student_config(teacher.config, StudentSection(sliding_window=64, layer_types=["linear_attention"] * n))
    docs = documents(processor)[:1]
    row = packed_row(teacher.config, docs)
    theirs, ours = {}, {}
    handles = [teacher_mixer(teacher, i).register_forward_hook(record(theirs, i)) for i in range(n)]
    alone(teacher, docs)
    for h in handles:
        h.remove()
    aligner = LayerwiseAligner(copy.deepcopy(teacher), config, loss_scale=1.0)  # it hooks the teacher it is given
    for i in aligner.linear_layers:
        aligner.packed.mixer(i).register_forward_hook(record(ours, i))
    aligner(row)
    kinds = [FAMILIES[family].teacher_layer_kind(teacher.config.text_config, i) for i in range(n)]
    for i, loss in zip(aligner.linear_layers, aligner._losses):
        torch.testing.assert_close(ours[i], theirs[i], atol=1e-4, rtol=1e-4)  # the target is the teacher's output
        assert (float(loss.detach()) < 1e-10) == (kinds[i] == "linear_attention"), (i, kinds[i], float(loss.detach()))


@pytest.mark.parametrize("mixer", ["gla", "mamba2", "kda"])
def test_stage1a_trains_every_mixer_of_the_table(mixer, one_thread):
    """`student.linear_mixer` takes any of model.mixer_names(): Stage I-a builds that mixer, its step reaches every
    mixer parameter, and the export is a student of that mixer with the trained weights."""
    import tempfile

    from pipeline.config import StudentSection
    from pipeline.train.objectives import LayerwiseAligner, student_config

    from model import MIXERS
    from model.checkpoint import load_pretrained

    teacher, processor = tiny("qwen2_5_vl")
    config = student_config(teacher.config, StudentSection(sliding_window=64, linear_mixer=mixer))
    aligner = LayerwiseAligner(copy.deepcopy(teacher), config, loss_scale=1.0)  # it hooks the teacher it is given
    assert all(type(m) is MIXERS[mixer] for m in aligner.mixers.values())
    loss, _ = aligner(packed_row(teacher.config, documents(processor)))
    loss.backward()
    # every parameter in the graph (a low-rank gate's first factor may start at zero gradient: its second is 0)
    assert all(p.grad is not None for p in aligner.mixers.parameters())
    assert sum(float(p.grad.abs().sum()) for p in aligner.mixers.parameters()) > 0
    with tempfile.TemporaryDirectory() as tmp:
        teacher.save_pretrained(f"{tmp}/teacher")
        aligner.export(aligner.state_dict(), f"{tmp}/teacher", f"{tmp}/export", processor)
        student, _ = load_pretrained(f"{tmp}/export")
    i = aligner.linear_layers[0]
    exported = student.model.language_model.layers[i].self_attn
    assert type(exported) is MIXERS[mixer]
    for name, p in aligner.mixers[str(i)].named_parameters():
        assert torch.equal(exported.get_parameter(name), p.detach()), name


def record(outputs: dict, i: int):
    """A forward hook keeping a module's output under `i` (and leaving it as it is)."""
    def hook(module, args, output):
        outputs[i] = output[0] if isinstance(output, tuple) else output
    return hook


def test_the_student_section_leaves_the_layout_and_linear_dims_to_the_family():
    from pipeline.config import ConfigError, StudentSection, config_from_dict, load_config
    from pipeline.train.objectives import student_config

    teacher, _ = tiny("qwen3_5")
    text = student_config(teacher.config, StudentSection(sliding_window=64)).text_config
    assert text.layer_types == FAMILIES["qwen3_5"].teacher_layout(teacher.config.text_config)  # its own 3 : 1
    t = teacher.config.text_config
    assert (text.num_linear_heads, text.num_linear_value_heads, text.linear_head_dim, text.conv_size) == \
        (t.linear_num_key_heads, t.linear_num_value_heads, t.linear_key_head_dim, t.linear_conv_kernel_dim)
    cfg = load_config(str(REPO / "configs/tiny.yaml"), ["student.linear_mixer=kda", "teacher.family=qwen3_vl"])
    qwen3_vl = tiny_teacher_config(tiny("qwen3_vl")[1].tokenizer, "qwen3_vl")
    text = student_config(qwen3_vl, cfg.student).text_config
    assert text.linear_mixer == "kda" and text.layer_types[:4] == ["sliding_attention"] + ["linear_attention"] * 3
    raw = cfg.model_dump(mode="json")
    raw["student"]["linear_mixer"], raw["teacher"]["family"] = "deltanet", "llama"
    with pytest.raises(ConfigError) as refused:
        config_from_dict(raw)
    assert "student.linear_mixer: unknown linear mixer 'deltanet'; mixers: gated_deltanet, gla, mamba2, kda" \
        in str(refused.value)
    assert "teacher.family: unknown teacher family 'llama'; families: " + ", ".join(FAMILY_NAMES) in str(refused.value)


# -- data and loader ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    videos = synthetic.write_videos(root / "videos", 2, seed=4, seconds=2.0, fps=8)
    pictures = synthetic.write_picture_questions(root / "pictures", 2, seed=1, kinds=["shapes"])
    return (SourceConfig(name="videos", format="llava", path=str(videos)),
            SourceConfig(name="pictures", format="llava", path=str(pictures)))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_data_stage_writes_videos_and_positions_as_the_family_does(family, sources):
    """A video record tokenized by the data stage equals the family's processor on the same conversation (its
    videos frame by frame with their times for Qwen3-VL and Qwen3.5); the loader's positions for a packed row of
    video and image documents equal the teacher's own get_rope_index on each document alone."""
    processor = load_processor(f"tiny:{family}")
    assert processor.video_layout == FAMILIES[family].video_layout
    config = tiny_teacher_config(processor.tokenizer, family)
    corpus = CorpusConfig(name="t", output="unused", sources=list(sources), max_pixels=28 * 28 * 64)
    samples = []
    for source, index in ((sources[0], 0), (sources[1], 0), (sources[0], 1)):
        record = read_record(source, index)
        samples.append(tokenize_record(record, source, corpus, processor, f"{source.name}:{index}"))
        sample = samples[-1]
        # the answers alone are supervised (Qwen3.5: not the empty thinking block its template opens them with)
        supervised = [t for t, label in zip(sample.input_ids, sample.labels) if label != -100]
        answers = [text for role, text in check_turns(record.turns) if role == "assistant"]
        assert processor.tokenizer.decode(supervised) == "".join(a + "<|im_end|>" for a in answers)
        clip_frames = [Image.open(io.BytesIO(f)) for v in sample.videos for f in v]
        if clip_frames:
            messages = _messages(check_turns(record.turns), n_images=0, has_video=True, n_pages=0)
            expected = processor([processor.apply_chat_template(messages)], videos=[clip_frames], video_fps=2.0)
            assert sample.input_ids == expected["input_ids"][0].tolist()
            runs = np.diff(np.r_[0, (np.array(sample.input_ids) == processor.video_token_id).astype(int)])
            assert int((runs == 1).sum()) == FAMILIES[family].video_runs(sample.video_grid_thw[0]) >= 1
    example = example_from_row(pack_row(samples), processor)
    assert ("second_per_grid_ts" in example) == (processor.video_layout == "qwen2_5_vl")
    # the loader's patches are the family's image processor's (its patch size, its normalisation)
    (image,), (grid,) = samples[1].images, samples[1].image_grid_thw
    area = grid[1] * grid[2] * processor.patch_size ** 2
    ours = processor.preprocess_images([Image.open(io.BytesIO(image))], min_pixels=area, max_pixels=area)
    assert ours["image_grid_thw"][0].tolist() == grid
    torch.testing.assert_close(example["pixel_values"], ours["pixel_values"], atol=1e-5, rtol=0)
    videos = [processor.preprocess_video([Image.open(io.BytesIO(f)) for f in s.videos[0]], fps=2.0)
              for s in (samples[0], samples[2])]
    torch.testing.assert_close(example["pixel_values_videos"], torch.cat([v["pixel_values_videos"] for v in videos]))
    reference = []
    for s in samples:
        ids = torch.tensor([s.input_ids])
        grids = [torch.tensor(g) if g else None for g in (s.image_grid_thw, s.video_grid_thw)]
        seconds = torch.tensor(s.second_per_grid_ts) if s.second_per_grid_ts else None
        reference.append(rope_index(config, ids, *grids, seconds)[0])
    assert torch.equal(example["position_ids"], torch.cat(reference, -1))


# -- eval --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_eval_loads_each_familys_teacher_and_student(family, tmp_path):
    from model import convert_teacher
    from pipeline.eval.api import load_checkpoint

    teacher, processor = tiny(family)
    teacher.save_pretrained(tmp_path / "teacher")
    processor.save_pretrained(str(tmp_path / "teacher"))
    convert_teacher(teacher).save_pretrained(tmp_path / "student")
    processor.save_pretrained(str(tmp_path / "student"))
    loaded_teacher, _ = load_checkpoint(str(tmp_path / "teacher"))
    loaded_student, loaded_processor = load_checkpoint(str(tmp_path / "student"))
    assert type(loaded_teacher) is FAMILIES[family].teacher_class
    assert type(loaded_student) is FAMILIES[family].model_class
    assert loaded_processor.video_layout == FAMILIES[family].video_layout


# -- the tiny pipeline, once per family --------------------------------------------------------------------------
# The default family (qwen2_5_vl) runs the same chain through the CLI in tests/test_flows_cli.py; every other
# family runs it here through the stages as the CLI plans them (pipeline.plan), without a Prefect server.

FAST = ["train.stage1a.steps=2", "train.stage1a.checkpoint_every=2",
        *[f"train.{s}.{f}=1" for s in ("stage1b", "stage2", "stage3") for f in ("steps", "checkpoint_every")],
        "teacher.train.steps=3", "teacher.train.eval_pictures=2", "data.distill.max_samples=16",
        "data.instruct.max_samples=16", "data.long.max_samples=2", "eval.max_samples=2", "eval.max_new_tokens=4",
        "eval.benchmarks=[sample, pictures]"]


def check_run(root: Path, family: str) -> Path:
    """Every stage committed, the eval scored; the family's teacher and student, data in its layout."""
    from transformers import AutoModelForImageTextToText

    from pipeline.config import load_config
    from pipeline.plan import status
    from pipeline.stages import committed

    cfg = load_config(str(REPO / "configs/tiny.yaml"), [f"run.root={root}", f"teacher.family={family}", *FAST])
    states = status(cfg)
    assert {n: s.state for n, s in states.items()} == {n: "done" for n in states}, states
    teacher_marker = committed(str(root / "teacher"))
    assert teacher_marker["metrics"]["family"] == family and teacher_marker["metrics"]["trained"]
    scores = committed(str(root / "eval"))["metrics"]
    assert all(isinstance(scores[s], float) for s in ("tiny", "pictures", "teacher_pictures")), scores
    export = Path(committed(str(root / "stage3"))["output"]) / "export"
    student = AutoModelForImageTextToText.from_pretrained(export)
    assert type(student) is FAMILIES[family].model_class
    teacher_dir = Path(teacher_marker["output"])
    teacher_text = json.loads((teacher_dir / "config.json").read_text())
    assert teacher_text["model_type"] == FAMILIES[family].teacher_model_type
    if not FAMILIES[family].packs_rows:  # Qwen3.5: its linear layers kept linear, attention made sliding
        t = FAMILIES[family].teacher_class.config_class.from_pretrained(teacher_dir).text_config
        assert student.config.text_config.layer_types == FAMILIES[family].teacher_layout(t)
    long = json.loads((Path(committed(str(root / "data"))["output"]) / "long/manifest.json").read_text())
    assert long["samples"] >= 1
    logits = json.loads((Path(committed(str(root / "teacher-logits"))["output"]) / "manifest.json").read_text())
    assert logits["teacher"]["vocab_size"] == student.config.text_config.vocab_size
    return export


def check_student_answers_and_streams(export: Path, family: str) -> None:
    """The exported student generates through `infinitevl generate` and streams frames in constant memory."""
    from model.checkpoint import load_pretrained
    from model.streaming import StreamingSession

    image = export.parent.parent / "picture.png"
    frames(1, 3)[0].save(image)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "generate", str(export), "--prompt", "how many shapes?",
                           "--image", str(image), "--max-new-tokens", "4"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    logging.getLogger(__name__).info("generate took %.1f s", time.monotonic() - started)
    model, processor = load_pretrained(export)
    session = StreamingSession(model, processor)
    session.push_frame(frames(1, 4)[0], 0.0)
    size = session.state_bytes
    for t, frame in enumerate(frames(3, 5), start=1):
        session.push_frame(frame, t / 2)
    assert session.state_bytes == size
    assert isinstance(session.ask("which object appeared?", max_new_tokens=3), str)


@pytest.mark.slow
@pytest.mark.parametrize("family", [f for f in FAMILY_NAMES if f != "qwen2_5_vl"])
def test_the_embedded_default_runs_with_every_other_teacher_family(family, tmp_path):
    """The tiny run's stages (as `infinitevl run` plans and runs them, without the Prefect server the CLI tests
    already start) with another family's teacher: every stage commits, the student answers and streams."""
    from pipeline.config import load_config
    from pipeline.plan import check_plan, preflight, run_stage

    root = tmp_path / "run"
    cfg = load_config(str(REPO / "configs/tiny.yaml"), [f"run.root={root}", f"teacher.family={family}", *FAST])
    names = check_plan(cfg)
    preflight(cfg, names)
    for name in names:
        run_stage(cfg, name, logging.getLogger(f"test.{family}"))
    export = check_run(root, family)
    check_student_answers_and_streams(export, family)
