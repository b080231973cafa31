"""A tiny Qwen2.5-VL teacher, tokenizer and processor built in code: no downloads, ever.

Used by the default CPU run (`configs/tiny.yaml`) and by the tests. The architecture is the real
Qwen2.5-VL code path with small dimensions; the tokenizer is a byte-level BPE trained here on a
fixed corpus (so it is deterministic) with Qwen's special tokens.
"""

from __future__ import annotations

import json
import string

import torch
from tokenizers import models, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2TokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .processing import CHAT_TEMPLATE, SPECIAL_TOKENS, InfiniteVLProcessor

_WORDS = (
    "what is the answer to the question how many shapes circles squares triangles are there in image picture "
    "video frame chart bar line value highest lowest color red green blue yellow black white text page read "
    "which object appeared at second first last left right top bottom count number word document title says "
    "yes no zero one two three four five six seven eight nine ten describe the scene of a with and or in on "
    "system user assistant you are helpful"
)


def _corpus() -> list[str]:
    lines = [_WORDS]
    lines += [" ".join(_WORDS.split()[i:i + 7]) for i in range(0, len(_WORDS.split()), 3)]
    lines += [string.ascii_letters + string.digits + string.punctuation, " ".join(str(i) for i in range(200))]
    return lines


def build_tokenizer(vocab_size: int = 512) -> Qwen2TokenizerFast:
    """A byte-level BPE trained here with Qwen2's own normaliser and pre-tokenizer, then handed to
    Qwen2TokenizerFast as vocab + merges, so that saving and loading it gives the very same tokenizer."""
    trainer_tok = Qwen2TokenizerFast(vocab={"<|endoftext|>": 0}, merges=[]).backend_tokenizer
    trainer_tok.model = models.BPE(unk_token=None)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trainer_tok.train_from_iterator(_corpus(), trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    fast = Qwen2TokenizerFast(vocab=trained["vocab"], merges=merges, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", unk_token=None, bos_token=None)
    fast.add_special_tokens({"additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in fast.get_vocab()]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(min_pixels: int = 28 * 28 * 4, max_pixels: int = 28 * 28 * 64) -> InfiniteVLProcessor:
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    return InfiniteVLProcessor(build_tokenizer(), image_processor)


def tiny_teacher_config(tokenizer, num_layers: int = 8, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                        intermediate: int = 128, vision_hidden: int = 32, vision_depth: int = 2) -> Qwen2_5_VLConfig:
    head_dim = hidden // heads
    quarter = head_dim // 2 // 4  # M-RoPE splits head_dim/2 frequencies into t/h/w sections
    sections = [head_dim // 2 - 2 * quarter, quarter, quarter]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_scaling={"type": "mrope", "mrope_section": sections}, bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
            out_hidden_size=hidden, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=56, fullatt_block_indexes=[vision_depth - 1], tokens_per_second=2,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_tiny_teacher(seed: int = 0, processor: InfiniteVLProcessor | None = None, **config_kwargs):
    """Returns (teacher, processor): a randomly initialised tiny Qwen2.5-VL in fp32 and its processor."""
    processor = processor or build_processor()
    config = tiny_teacher_config(processor.tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model, processor
