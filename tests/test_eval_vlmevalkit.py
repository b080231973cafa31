"""The VLMEvalKit adapter without VLMEvalKit: message conversion, generation, prompts, class assembly."""

import subprocess
import sys
import types

import pytest
import torch
from PIL import Image

from pipeline.eval.dataset import encode_image
from pipeline.eval.runner import EvalConfig, generate_batch
from pipeline.eval.vlmevalkit import InfiniteVLChat, prompt_for_line, vlmevalkit_model_class
from tests.helpers import lively_tiny_teacher


@pytest.fixture(scope="module")
def lively_teacher():
    return lively_tiny_teacher(weight_seed=1)


@pytest.fixture
def images(tmp_path):
    paths = []
    for i, (color, size) in enumerate((("red", (56, 56)), ("blue", (112, 56)))):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", size, color).save(path)
        paths.append(str(path))
    return paths


def test_module_does_not_import_vlmevalkit():
    code = "import sys, pipeline.eval.vlmevalkit; print('vlmeval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_interleaved_message_becomes_the_processor_inputs_in_order(tiny_teacher, images):
    model, processor = tiny_teacher
    chat = InfiniteVLChat(model=model, processor=processor)
    message = [{"type": "text", "value": "Compare"}, {"type": "image", "value": images[0]},
               {"type": "text", "value": "with"}, {"type": "image", "value": images[1]}]
    inputs = chat.build_inputs(message)
    text = processor.decode(inputs["input_ids"][0], skip_special_tokens=False)
    # 56x56 -> 2x2 merged patches, 112x56 -> 4x2
    expected = ("<|im_start|>user\nCompare<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>with"
                "<|vision_start|>" + "<|image_pad|>" * 8 + "<|vision_end|><|im_end|>\n<|im_start|>assistant\n")
    assert text.endswith(expected)
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8]]
    direct = processor(text=[processor.apply_chat_template([{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "with"}, {"type": "image"}]}],
        add_generation_prompt=True)], images=[Image.open(p).convert("RGB") for p in images])
    assert torch.equal(inputs["pixel_values"], direct["pixel_values"])


def test_generate_inner_answers_like_the_runner(lively_teacher, images):
    model, processor = lively_teacher
    chat = InfiniteVLChat(model=model, processor=processor, max_new_tokens=5)
    sample = {"id": "0", "suite": "x", "image": encode_image(Image.open(images[1])), "question": "What colour?",
              "answers": ["blue"], "metric": "vqa"}
    message = [{"type": "image", "value": images[1]},
               {"type": "text", "value": "What colour?\nAnswer the question using a single word or phrase."}]
    answer = chat.generate_inner(message, dataset=None)
    assert answer == generate_batch(model, processor, [sample], EvalConfig(max_new_tokens=5))[0]
    assert answer  # the lively model says something


def test_video_item_is_sampled_into_one_timed_video(tiny_teacher, tmp_path):
    import av
    import numpy as np

    with av.open(str(tmp_path / "v.mp4"), "w") as container:  # 2 s of 56x56 frames at 10 fps
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = 56
        stream.pix_fmt = "yuv420p"
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((56, 56, 3), 10 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    model, processor = tiny_teacher
    chat = InfiniteVLChat(model=model, processor=processor, video_frames=8, max_new_tokens=2)
    message = [{"type": "video", "value": str(tmp_path / "v.mp4")}, {"type": "text", "value": "What happens?"}]
    inputs = chat.build_inputs(message)
    # 8 frames -> 4 temporal patches of 2x2 merged patches; 8 frames over 2 s -> 4 fps, 0.5 s a patch
    assert inputs["video_grid_thw"].tolist() == [[4, 4, 4]]
    assert (inputs["input_ids"] == processor.video_token_id).sum().item() == 16
    assert inputs["second_per_grid_ts"].tolist() == [0.5]
    assert isinstance(chat.generate_inner(message), str)


def test_rejects_other_item_types(tiny_teacher):
    model, processor = tiny_teacher
    with pytest.raises(ValueError, match="audio"):
        InfiniteVLChat(model=model, processor=processor).build_inputs([{"type": "audio", "value": "x.wav"}])


def test_prompt_for_mcq_and_vqa_rows():
    row = {"index": 3, "question": "Which colour?", "hint": float("nan"), "A": "red", "B": "blue", "C": float("nan"),
           "answer": "B"}
    assert prompt_for_line(row, "MCQ") == ("Which colour?\nOptions:\nA. red\nB. blue\n"
                                           "Answer with the option's letter from the given choices directly.")
    assert prompt_for_line({"question": "What is written?"}, "VQA") == (
        "What is written?\nAnswer the question using a single word or phrase.")
    open_question = {"question": "What is x?", "A": float("nan"), "answer": "3"}
    assert prompt_for_line(open_question, "MCQ") == "What is x?\nAnswer the question using a single word or phrase."


def test_custom_prompts_only_for_choice_and_extractive_datasets(monkeypatch, tiny_teacher):
    types_by_name = {"MMBench_DEV_EN": "MCQ", "DocVQA_VAL": "VQA", "MathVista_MINI": "VQA", "OCRBench": "VQA"}
    dataset_module = types.ModuleType("vlmeval.dataset")
    dataset_module.DATASET_TYPE = types_by_name.__getitem__
    monkeypatch.setitem(sys.modules, "vlmeval", types.ModuleType("vlmeval"))
    monkeypatch.setitem(sys.modules, "vlmeval.dataset", dataset_module)
    model, processor = tiny_teacher
    chat = InfiniteVLChat(model=model, processor=processor)
    assert {name: chat.use_custom_prompt(name) for name in types_by_name} == {
        "MMBench_DEV_EN": True, "DocVQA_VAL": True, "MathVista_MINI": False, "OCRBench": False}
    assert not InfiniteVLChat(model=model, processor=processor, custom_prompt=False).use_custom_prompt("MMBench_DEV_EN")


def test_vlmevalkit_class_without_vlmevalkit_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vlmeval", None)
    with pytest.raises(ImportError, match="VLMEvalKit is not installed"):
        vlmevalkit_model_class()


def test_vlmevalkit_class_puts_our_methods_before_base_model(monkeypatch, tiny_teacher):
    # A stand-in for vlmeval.vlm.base with the one class the adapter builds on.
    class BaseModel:
        INTERLEAVE = False

        def use_custom_prompt(self, dataset):
            return False

        def generate(self, message, dataset=None):
            return self.generate_inner(message, dataset)

    for name in ("vlmeval", "vlmeval.vlm", "vlmeval.vlm.base"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["vlmeval.vlm.base"].BaseModel = BaseModel
    cls = vlmevalkit_model_class()
    assert cls.__mro__[1:3] == (InfiniteVLChat, BaseModel) and cls.INTERLEAVE is True
    model, processor = tiny_teacher
    chat = cls(model=model, processor=processor, max_new_tokens=2)
    assert isinstance(chat.generate([{"type": "text", "value": "hi"}]), str)
