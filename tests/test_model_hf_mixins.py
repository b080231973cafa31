"""transformers' own model tests, ModelTesterMixin and GenerationTesterMixin of the installed version, against
the student's classes (layer_types [sliding, linear], window 4), the way every model in transformers is tested.

The mixins come from transformers' test files for the installed version, found or fetched when the tests are
collected (tests/transformers_tree.py says from where; none are kept in this repository). Without them this
module is one skipped test that says why. The tester below gives the mixins a tiny student and its inputs in the
shapes of transformers' Qwen2.5-VL tester (an image of one merged patch in a 7-token prompt).

A mixin test that cannot apply to a hybrid of sliding-window attention and linear mixers is skipped with its
reason in NOT_APPLICABLE, the one list of them; every other one must pass."""

from __future__ import annotations

import unittest

import pytest
import torch

from tests import transformers_tree

TREE, WHY = transformers_tree.find()

# test name -> why it cannot apply to this model (every name must be a test of the loaded mixins). Under
# transformers 5.25.0 every ModelTesterMixin test applies: those not run here are skipped by the mixins themselves
# (no GPU, no flash-attn, no DeepSpeed, no expert layers, ...).
NOT_APPLICABLE: dict[str, str] = {}

# where the tree has no generation tests (their files stood in for, tests/transformers_tree.py)
NOT_RUN_WITHOUT_GENERATION_TESTS = {
    "test_generation_tester_mixin_inheritance": "transformers' generation tests are not in its source release and its "
                                                "repository was not reachable: GenerationTesterMixin is not run",
}


class StudentTester:
    """A tiny student of a Qwen2.5-VL teacher with its inputs, in the shapes of transformers' own tester."""

    batch_size = 3
    seq_length = 7
    num_hidden_layers = 2
    num_attention_heads = 4
    hidden_size = 32
    vocab_size = 99
    is_training = True
    image_token_id, video_token_id, vision_start_token_id, vision_end_token_id = 3, 4, 5, 6
    pad_token_id = 0

    def __init__(self, parent):
        self.parent = parent

    def get_config(self):
        from transformers import Qwen2_5_VLConfig

        from model import InfiniteVLConfig

        teacher = Qwen2_5_VLConfig(
            text_config=dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=37,
                             num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                             num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
                             rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, pad_token_id=0,
                             bos_token_id=0, eos_token_id=0, tie_word_embeddings=True),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=42, num_heads=4, out_hidden_size=32,
                               patch_size=14, spatial_merge_size=1, temporal_patch_size=2, window_size=14,
                               fullatt_block_indexes=[0], in_chans=3, tokens_per_second=2),
            image_token_id=self.image_token_id, video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id, vision_end_token_id=self.vision_end_token_id,
            tie_word_embeddings=True)
        return InfiniteVLConfig.from_teacher(teacher, layer_types=["sliding_attention", "linear_attention"],
                                             sliding_window=4)

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        B, T = self.batch_size, self.seq_length
        input_ids = torch.randint(7, self.vocab_size, (B, T))
        input_ids[:, 0] = self.vision_start_token_id
        input_ids[:, 1] = self.image_token_id  # one merged patch per image
        input_ids[:, 2] = self.vision_end_token_id
        pixel_values = torch.rand(B, 3 * 2 * 14 * 14)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones(B, T, dtype=torch.long),
                  "pixel_values": pixel_values, "image_grid_thw": torch.tensor([[1, 1, 1]] * B),
                  "mm_token_type_ids": (input_ids == self.image_token_id).long()}
        return config, inputs


if TREE is None:
    def test_transformers_mixins():
        pytest.skip(WHY)
else:
    common = transformers_tree.load(TREE, "test_modeling_common")
    bases = [common.ModelTesterMixin]
    skips = dict(NOT_APPLICABLE)
    if TREE.has_generation_tests:
        bases.append(transformers_tree.load(TREE, "generation.test_utils").GenerationTesterMixin)
    else:
        skips.update(NOT_RUN_WITHOUT_GENERATION_TESTS)

    class StudentMixinTest(*bases, unittest.TestCase):
        from model import InfiniteVLForConditionalGeneration, InfiniteVLModel

        all_model_classes = (InfiniteVLModel, InfiniteVLForConditionalGeneration)
        _is_composite = True  # a vision tower and a language model, each with its own config

        @classmethod
        def setUpClass(cls):
            # in-tree models are known to the mixins by their listing in transformers' name tables (a base model
            # has no loss to train; an image-text-to-text model is given labels); ours are registered with the
            # Auto classes instead, so the test lists them there for its own duration, under a key that is no
            # model_type (the Auto classes never read it)
            for table, model_class in _name_tables(cls):
                table[cls.__name__] = model_class.__name__
            super().setUpClass()

        @classmethod
        def tearDownClass(cls):
            for table, _ in _name_tables(cls):
                table.pop(cls.__name__, None)
            super().tearDownClass()

        def setUp(self):
            self.model_tester = StudentTester(self)
            self._threads = torch.get_num_threads()
            torch.set_num_threads(1)  # tiny matrices: one thread is several times faster on a shared machine

        def tearDown(self):
            torch.set_num_threads(self._threads)

    def _name_tables(cls):
        from transformers.models.auto import modeling_auto

        base, generative = cls.all_model_classes
        return ((modeling_auto.MODEL_MAPPING_NAMES, base),
                (modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, generative))

    unknown = sorted(name for name in skips if not hasattr(StudentMixinTest, name))
    if unknown:
        raise AssertionError(f"the skip lists name tests that transformers {transformers_tree.version()}'s mixins do "
                             f"not have: {unknown}")
    for _name, _why in skips.items():
        setattr(StudentMixinTest, _name, unittest.skip(_why)(lambda self: None))
