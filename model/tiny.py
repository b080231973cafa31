"""A tiny teacher of any family, its tokenizer and processor, built in code: no downloads, ever.

Used by the default CPU run (`configs/tiny.yaml`) and by the tests. The architecture is the family's real
transformers code path with small dimensions (each family's `tiny_config`); the tokenizer is a byte-level BPE
trained here on a fixed corpus (so it is deterministic) with Qwen's special tokens.
"""

from __future__ import annotations

import json
import string

import torch
from tokenizers import models, pre_tokenizers, trainers
from transformers import Qwen2TokenizerFast
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .families import family_of
from .processing import SPECIAL_TOKENS, InfiniteVLProcessor

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


def build_tokenizer(vocab_size: int = 512, family: str = "qwen2_5_vl") -> Qwen2TokenizerFast:
    """A byte-level BPE trained here with Qwen2's own normaliser and pre-tokenizer, then handed to
    Qwen2TokenizerFast as vocab + merges, so that saving and loading it gives the very same tokenizer; Qwen's
    special tokens plus the family's own (Qwen3.5's thinking tags), and the family's chat template."""
    fam = family_of(family)
    specials = SPECIAL_TOKENS + list(fam.extra_special_tokens)
    trainer_tok = Qwen2TokenizerFast(vocab={"<|endoftext|>": 0}, merges=[]).backend_tokenizer
    trainer_tok.model = models.BPE(unk_token=None)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trainer_tok.train_from_iterator(_corpus(), trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    fast = Qwen2TokenizerFast(vocab=trained["vocab"], merges=merges, eos_token="<|im_end|>",
                              pad_token="<|endoftext|>", unk_token=None, bos_token=None)
    fast.add_special_tokens({"additional_special_tokens": [t for t in specials if t not in fast.get_vocab()]})
    fast.chat_template = fam.chat_template
    return fast


def build_processor(min_pixels: int | None = None, max_pixels: int | None = None,
                    family: str = "qwen2_5_vl") -> InfiniteVLProcessor:
    """The family's processor over the tiny tokenizer: images of 4 to 64 merged patches by default."""
    fam = family_of(family)
    ip = fam.image_processor
    factor = ip["patch_size"] * ip["merge_size"]
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels or factor * factor * 4,
                                               max_pixels=max_pixels or factor * factor * 64, **ip)
    return InfiniteVLProcessor(build_tokenizer(family=family), image_processor, chat_template=fam.chat_template,
                               video_layout=fam.video_layout)


def tiny_teacher_config(tokenizer, family: str = "qwen2_5_vl", **dims):
    """A tiny teacher config of `family` for `tokenizer` (dims: that family's `tiny_config` keywords)."""
    return family_of(family).tiny_config(tokenizer, **dims)


def build_tiny_teacher(seed: int = 0, processor: InfiniteVLProcessor | None = None, family: str = "qwen2_5_vl",
                       **config_kwargs):
    """Returns (teacher, processor): a randomly initialised tiny teacher of `family` in fp32 and its processor."""
    processor = processor or build_processor(family=family)
    config = tiny_teacher_config(processor.tokenizer, family, **config_kwargs)
    torch.manual_seed(seed)
    model = family_of(family).teacher_class(config).eval()
    model.generation_config.pad_token_id = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config.eos_token_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return model, processor
