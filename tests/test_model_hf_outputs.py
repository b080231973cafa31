"""What a user of a transformers model relies on beyond logits: hidden states and attention weights (in forward
and in generate), tuple outputs, dtype loading, and device maps that never split a decoder layer. The reference
is transformers' own Qwen2.5-VL: a student whose layers are all sliding windows wider than the input computes
what its teacher computes, layer by layer."""

import copy

import pytest
import torch
from transformers import AutoModelForImageTextToText

from model import convert_from_qwen2_5_vl
from model.checkpoint import save_pretrained
from tests.helpers import random_image

W = 4


def _batch(processor, question="how many circles are there?", seed=0):
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": question}]}], True)
    return processor([text], images=[random_image(seed)])


@pytest.fixture(scope="module")
def hybrid(tiny_teacher):
    torch.manual_seed(0)
    return convert_from_qwen2_5_vl(tiny_teacher[0], sliding_window=W, init="random").eval()


def test_hidden_states_and_attentions_equal_the_teachers_layer_by_layer(tiny_teacher):
    teacher, processor = tiny_teacher
    student = convert_from_qwen2_5_vl(teacher, layer_types=["sliding_attention"] * 8, sliding_window=4096).eval()
    eager = copy.deepcopy(teacher)
    eager.set_attn_implementation("eager")
    batch = _batch(processor)
    with torch.no_grad():
        ours = student(**batch, output_hidden_states=True, output_attentions=True)
        theirs = eager(**batch, output_hidden_states=True, output_attentions=True)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 9
    for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"hidden state {i}")
    assert len(ours.attentions) == len(theirs.attentions) == 8
    for i, (a, b) in enumerate(zip(ours.attentions, theirs.attentions)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=f"attentions of layer {i}")


def test_hybrid_gives_every_layers_output_and_the_sliding_layers_weights(hybrid, processor):
    batch = _batch(processor)
    T = batch["input_ids"].shape[1]
    captured = []
    handles = [layer.register_forward_hook(lambda m, args, out: captured.append(out[0]))
               for layer in hybrid.model.language_model.layers]
    try:
        with torch.no_grad():
            out = hybrid(**batch, output_hidden_states=True, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    text = hybrid.model.language_model
    assert len(out.hidden_states) == 9
    inputs_embeds = text.embed_tokens(batch["input_ids"])
    assert not torch.equal(out.hidden_states[0], inputs_embeds)  # the image features are in place already
    for i in range(1, 8):
        assert torch.equal(out.hidden_states[i], captured[i - 1])
    torch.testing.assert_close(out.hidden_states[8], text.norm(captured[7]))
    types = hybrid.config.text_config.layer_types
    # the sliding layers' weights, in layer order; a linear layer has no entry (as in transformers' hybrids)
    assert len(out.attentions) == types.count("sliding_attention") < len(types)
    for weights in out.attentions:
        assert weights.shape == (1, 4, T, T)
        torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4, T))
        i, j = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
        outside = (i - j >= W) | (j > i)  # a query sees itself and the W - 1 tokens before it
        assert (weights[..., outside] == 0).all() and (weights[..., ~outside] > 0).all()


def test_cached_step_weights_are_the_full_forwards_over_the_window(hybrid):
    ids = torch.randint(10, 400, (1, 11), generator=torch.Generator().manual_seed(0))
    cache = hybrid.new_cache()
    with torch.no_grad():
        full = hybrid(input_ids=ids, output_attentions=True).attentions[0]
        hybrid(input_ids=ids[:, :10], cache=cache, use_cache=True)
        step = hybrid(input_ids=ids[:, 10:], cache=cache, use_cache=True, output_attentions=True).attentions[0]
    # the ring's slots come back in position order: positions 7..10
    torch.testing.assert_close(step[0, :, 0], full[0, :, 10, 7:11], atol=1e-6, rtol=1e-5)


def test_generate_returns_each_steps_hidden_states_and_attentions(hybrid, processor):
    batch = _batch(processor)
    T = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = hybrid.generate(**batch, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                              output_hidden_states=True, output_attentions=True)
        full = hybrid(input_ids=out.sequences, attention_mask=torch.ones_like(out.sequences),
                      pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                      output_hidden_states=True)
    assert len(out.hidden_states) == len(out.attentions) == 4
    assert [h.shape[1] for h in out.hidden_states[0]] == [T] * 9
    for step in range(4):
        hidden = out.hidden_states[step]
        assert len(hidden) == 9 and hidden[-1].shape[1] == (T if step == 0 else 1)
        at = slice(0, T) if step == 0 else slice(T + step - 1, T + step)
        torch.testing.assert_close(hidden[-1], full.hidden_states[-1][:, at], atol=1e-4, rtol=1e-4)
        weights = out.attentions[step]
        assert len(weights) == hybrid.config.text_config.layer_types.count("sliding_attention")
        assert all(w.shape[-2:] == ((T, T) if step == 0 else (1, W)) for w in weights)


def _same(a, b, where="output"):
    """transformers' notion of equal outputs: tensors equal, tuples and outputs item by item, None with None."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif hasattr(a, "to_tuple"):
        _same(a.to_tuple(), b.to_tuple(), where)
    else:
        assert a is b, where


def test_tuple_outputs_equal_the_dict_outputs(hybrid, processor):
    batch = _batch(processor)
    labels = batch["input_ids"].clone()
    kwargs = dict(labels=labels, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        as_dict = hybrid(**batch, **kwargs)
        as_tuple = hybrid(**batch, **kwargs, return_dict=False)
        plain = hybrid(**batch, return_dict=False)
        cached = hybrid(**batch, use_cache=True, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert [type(x) for x in as_tuple][:4] == [torch.Tensor, torch.Tensor, tuple, tuple]  # loss, logits, hidden, attn
    _same(as_tuple, as_dict.to_tuple())
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    assert len(plain) == 2  # logits, image outputs (SDPA here, the explicit softmax above: equal to float noise)
    torch.testing.assert_close(plain[0], as_dict.logits)
    assert cached[1].get_seq_length() == labels.shape[1]  # logits, cache, image outputs


def test_hidden_states_by_index_and_from_the_config(hybrid):
    ids = torch.randint(10, 400, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        every = hybrid(input_ids=ids, output_hidden_states=True).hidden_states
        some = hybrid(input_ids=ids, output_hidden_states=[0, -1, 3]).hidden_states
        config = copy.deepcopy(hybrid.config)
        config.output_hidden_states = True
        default = type(hybrid)(config).eval()
        default.load_state_dict(hybrid.state_dict())
        from_config = default(input_ids=ids).hidden_states
    assert [h is not None for h in some] == [i in (0, 3, 8) for i in range(9)]
    for i in (0, 3, 8):
        assert torch.equal(some[i], every[i])
    assert len(from_config) == 9 and torch.equal(from_config[5], every[5])


def test_loading_in_another_dtype(hybrid, processor, tmp_path):
    save_pretrained(hybrid, processor, tmp_path)
    batch = _batch(processor)
    bf16 = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype="auto")
    assert {p.dtype for p in auto.parameters()} == {torch.float32}
    with torch.no_grad():
        got = bf16(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}).logits
        want = hybrid(**batch).logits
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()
    assert (got.float().argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_device_map_offloads_whole_decoder_layers_and_computes_the_same(hybrid, processor, tmp_path):
    """accelerate splits the model at the modules `_no_split_modules` names (each one exists in the model), here
    between memory and disk, and the offloaded model gives the same logits."""
    from accelerate.utils import compute_module_sizes

    names = {type(m).__name__ for m in hybrid.modules()}
    assert set(hybrid._no_split_modules) <= names
    save_pretrained(hybrid, processor, tmp_path / "model")
    size = compute_module_sizes(hybrid)[""]
    offloaded = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": int(size * 0.5)},
        offload_folder=str(tmp_path / "offload")).eval()
    placed = offloaded.hf_device_map
    assert "disk" in placed.values() and "cpu" in placed.values()
    for name in placed:
        assert ".self_attn" not in name and ".mlp" not in name, f"a decoder layer was split: {name}"
    batch = _batch(processor)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(**batch).logits, hybrid(**batch).logits, atol=1e-5, rtol=1e-5)
