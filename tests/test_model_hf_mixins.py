"""transformers' own model tests, ModelTesterMixin and GenerationTesterMixin of the installed version, against
the student's classes (layer_types [sliding, linear], window 4), the way every model in transformers is tested.

The mixins come from transformers' test files for the installed version, found or fetched when the tests are
collected (tests/transformers_tree.py says from where; none are kept in this repository). Without them this
module is one skipped test that says why. The tester below gives the mixins a tiny student and its inputs in the
shapes of transformers' Qwen2.5-VL tester (an image of one merged patch in a 7-token prompt).

A mixin test that cannot apply to a hybrid of sliding-window attention and linear mixers is skipped with its
reason in NOT_APPLICABLE, the one list of them; every other one must pass."""

from __future__ import annotations

import copy
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

        # The generation mixin checks outputs and caches through these helpers, written for a full-attention
        # model with transformers' own caches; a model whose outputs or cache differ overrides them (as
        # transformers' hybrid models do). Ours: an attention entry per sliding layer (a linear one has none), whose
        # keys are the whole sequence without a cache and the ring (at most W) with one.
        def _check_attentions_for_generate(self, batch_size, attentions, prompt_length, output_length, config,
                                           decoder_past_key_values):
            text = config.get_text_config(decoder=True)
            self.assertIsInstance(attentions, tuple)
            self.assertEqual(len(attentions), output_length - prompt_length)
            cached = decoder_past_key_values is not None
            for step, layers in enumerate(attentions):
                self.assertIsInstance(layers, tuple)
                self.assertEqual(len(layers), text.layer_types.count("sliding_attention"))
                seen = prompt_length + step
                for weights in layers:
                    if cached and step > 0:  # the ring, then the tokens fed with this one (a draft being verified)
                        self.assertEqual(tuple(weights.shape[:3]), (batch_size, text.num_attention_heads, 1))
                        self.assertTrue(min(text.sliding_window, seen) <= weights.shape[3] <= seen)
                    else:
                        self.assertEqual(tuple(weights.shape), (batch_size, text.num_attention_heads, seen, seen))

        def test_attention_outputs(self):
            """The mixin's test counts an entry per decoder layer; ours are the sliding layers' (as transformers'
            own hybrids override it), through the argument and the config, and in tuple outputs."""
            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            text = config.get_text_config(decoder=True)
            T = self.model_tester.seq_length
            expected = [(self.model_tester.batch_size, text.num_attention_heads, T, T)] * \
                text.layer_types.count("sliding_attention")
            for model_class in self.all_model_classes:
                model = model_class._from_config(config, attn_implementation="eager").eval()
                with torch.no_grad():
                    out = model(**inputs, output_attentions=True)
                    self.assertEqual([tuple(a.shape) for a in out.attentions], expected)
                    from_config = model_class._from_config(copy.deepcopy(config), attn_implementation="eager")
                    from_config.config.output_attentions = True
                    from_config.load_state_dict(model.state_dict())
                    self.assertEqual([tuple(a.shape) for a in from_config.eval()(**inputs).attentions], expected)
                    as_tuple = model(**inputs, output_attentions=True, output_hidden_states=True, return_dict=False)
                    self.assertEqual(len(as_tuple), len(model(**inputs, output_hidden_states=True,
                                                             return_dict=False)) + 1)
                    self.assertIn(expected, [[tuple(a.shape) for a in x] for x in as_tuple if isinstance(x, tuple)
                                             and all(torch.is_tensor(a) and a.dim() == 4 for a in x)])

        def _check_past_key_values_for_generate(self, batch_size, past_key_values, seq_length, config):
            from model.cache import InfiniteVLCache, RecurrentStateCache, SlidingWindowCache

            text = config.get_text_config(decoder=True)
            self.assertIsInstance(past_key_values, InfiniteVLCache)
            self.assertEqual(past_key_values.get_seq_length(), seq_length)
            self.assertEqual(len(past_key_values.layers), text.num_hidden_layers)
            head_dim = text.hidden_size // text.num_attention_heads
            for kind, layer in zip(text.layer_types, past_key_values.layers):
                if kind == "linear_attention":
                    self.assertIsInstance(layer, RecurrentStateCache)
                    self.assertEqual(layer.state.shape[0], batch_size)
                    self.assertTrue(all(c.shape[0] == batch_size for c in layer.conv.values()))
                else:  # the ring: W slots whatever the length, which is the point
                    self.assertIsInstance(layer, SlidingWindowCache)
                    ring = (batch_size, text.num_key_value_heads, text.sliding_window, head_dim)
                    self.assertEqual(tuple(layer.keys.shape), ring)
                    self.assertEqual(tuple(layer.values.shape), ring)

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
