"""Speculative decoding over the constant-size cache: the cache takes back rejected draft tokens exactly (ring
slots and linear states as if those tokens had never come), with a rollback buffer bounded by the draft length,
and transformers' assisted decoding and prompt lookup give the model's own greedy tokens.

The independent reference throughout is the model without speculation: a full forward over the accepted tokens
(no cache), and plain greedy generate(). Windows are 4 tokens and prompts longer, so every ring wraps."""

import pytest
import torch

from model import InfiniteVLCache, convert_from_qwen2_5_vl
from model.cache import journal_limit
from model.draft import layer_skip_draft
from model.tiny import build_tiny_teacher
from tests.helpers import lively_tiny_teacher

W = 4
DRAFT = 5


@pytest.fixture(scope="module")
def lively():
    return lively_tiny_teacher()[0]


@pytest.fixture(scope="module")
def student(lively):
    torch.manual_seed(0)
    return convert_from_qwen2_5_vl(lively, sliding_window=W, init="random").eval()


@pytest.fixture(scope="module")
def two_layer_draft():
    """A separately built 2-layer student (sliding + Gated DeltaNet) of the same vocabulary."""
    teacher, _ = build_tiny_teacher(seed=1, num_layers=2)
    torch.manual_seed(3)
    draft = convert_from_qwen2_5_vl(teacher, sliding_window=W, init="random").eval()
    draft.generation_config.num_assistant_tokens = DRAFT
    draft.generation_config.assistant_confidence_threshold = 0.0  # always draft DRAFT tokens
    return draft


class CropLog:
    """Records every crop: which cache, how many tokens taken back, and the cache's bytes at that moment."""

    def __init__(self, monkeypatch):
        self.calls = []
        crop = InfiniteVLCache.crop

        def spy(cache, n):
            self.calls.append((id(cache), -n, cache.nbytes()))
            return crop(cache, n)

        monkeypatch.setattr(InfiniteVLCache, "crop", spy)

    def taken_back(self) -> dict:
        """Per cache, the counts of tokens taken back by the crops that took any."""
        out = {}
        for cache, r, _ in self.calls:
            if r:
                out.setdefault(cache, []).append(r)
        return out


def _prompt(n, seed=1, vocab=400):
    ids = torch.randint(10, vocab, (1, n), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def _greedy(model, ids, mask, n, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, **kwargs)


# -- the cache's own rollback -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mixer", ["gated_deltanet", "mamba2", "gla", "kda"])
def test_taking_back_tokens_leaves_the_cache_as_if_they_never_came(lively, mixer, one_thread):
    """Rounds as a verifier sees them (the last accepted token and DRAFT drafts in one forward) and as a draft
    model sees them (one token per forward), each followed by taking back r tokens; after every forward the
    new tokens' logits equal a full forward over the tokens kept so far (fp32; chunked and step-by-step forms
    differ by summation order, ~1e-5). The prompt is longer than the journal
    (its checkpoint lands inside the prompt), and rollbacks reach past the window of 4."""
    torch.manual_seed(0)
    model = convert_from_qwen2_5_vl(lively, sliding_window=W, init="random", linear_mixer=mixer).eval()
    gen = torch.Generator().manual_seed(0)
    new = lambda n: torch.randint(5, 400, (1, n), generator=gen)  # noqa: E731
    cache = InfiniteVLCache(model.config)
    cache.activate_past_recording(recurrent_states_to_keep=DRAFT)
    kept = new(journal_limit(DRAFT) + 5)
    rounds = [("verify", r) for r in (5, 0, 2, 5, 1, 3, 0, 4, 5)] + [("draft", r) for r in (4, 0, 2, 1)] + \
        [("verify", 3), ("draft", 4)]
    with torch.no_grad():
        got = model(input_ids=kept, cache=cache, use_cache=True).logits
        torch.testing.assert_close(got, model(input_ids=kept).logits, atol=1e-4, rtol=1e-4)
        for kind, r in rounds:
            ids = new(DRAFT + 1) if kind == "verify" else new(DRAFT)
            steps = [ids] if kind == "verify" else list(ids.split(1, dim=1))
            logits = torch.cat([model(input_ids=t, cache=cache, use_cache=True).logits for t in steps], 1)
            full = model(input_ids=torch.cat([kept, ids], 1)).logits[:, -ids.shape[1]:]
            torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4, msg=f"{kind} round before crop(-{r})")
            cache.crop(-r)
            kept = torch.cat([kept, ids[:, :ids.shape[1] - r]], 1)
            assert cache.get_seq_length() == kept.shape[1]
        # the kept tokens of the last round are fed again in front of the next ones
        tail = new(2)
        torch.testing.assert_close(model(input_ids=tail, cache=cache, use_cache=True).logits,
                                   model(input_ids=torch.cat([kept, tail], 1)).logits[:, -2:], atol=1e-4, rtol=1e-4)


def test_crop_says_what_it_cannot_do(student):
    cache = InfiniteVLCache(student.config)
    ids, _ = _prompt(8)
    with torch.no_grad():
        student(input_ids=ids, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="negative count"):
        cache.crop(2)
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        cache.crop(-1)
    cache.crop(0)  # nothing to take back: always fine
    cache.activate_past_recording(recurrent_states_to_keep=2)
    with torch.no_grad():
        student(input_ids=ids[:, :3], cache=cache, use_cache=True)
    limit = journal_limit(2)
    with torch.no_grad():
        for t in ids.repeat(1, 2)[:, :limit].split(1, dim=1):
            student(input_ids=t, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="recurrent_states_to_keep"):
        cache.crop(-(limit + 1))
    assert cache.get_seq_length() == 8 + 3 + limit  # a refused crop changes nothing


def test_a_long_prompt_leaves_only_the_last_tokens_in_the_journals(student):
    """A prompt of 40 tokens fed while recording keeps the last `depth` tokens' inputs, in storage of their own size
    (not views of the whole prompt's)."""
    cache = InfiniteVLCache(student.config)
    cache.activate_past_recording(recurrent_states_to_keep=2)
    with torch.no_grad():
        student(input_ids=_prompt(40)[0], cache=cache, use_cache=True)
    for layer in cache.layers:
        if cache.is_linear[cache.layers.index(layer)]:
            held = layer.journal.inputs
            assert held.shape[1] == 2 and held.untyped_storage().nbytes() == held.numel() * held.element_size()
        else:
            assert len(layer.journal) == journal_limit(2)


# -- transformers' generate ---------------------------------------------------------------------------------------

def test_assisted_decoding_with_a_two_layer_draft_equals_greedy(student, two_layer_draft, monkeypatch, one_thread):
    ids, mask = _prompt(12)
    expected = _greedy(student, ids, mask, 12)
    log = CropLog(monkeypatch)
    assert torch.equal(_greedy(student, ids, mask, 12, assistant_model=two_layer_draft), expected)
    taken = log.taken_back()
    assert len(taken) == 2, "both the model's and the draft's cache took back rejected drafts"


def test_assisted_decoding_returns_scores_hidden_states_and_attentions_as_greedy_does(student, two_layer_draft,
                                                                                     one_thread):
    """transformers splits each verification's outputs per accepted token, walking every attention entry."""
    ids, mask = _prompt(12)
    kwargs = dict(return_dict_in_generate=True, output_scores=True, output_hidden_states=True,
                  output_attentions=True)
    greedy = _greedy(student, ids, mask, 8, **kwargs)
    assisted = _greedy(student, ids, mask, 8, assistant_model=two_layer_draft, **kwargs)
    assert torch.equal(assisted.sequences, greedy.sequences)
    sliding = student.config.text_config.layer_types.count("sliding_attention")
    layers = student.config.text_config.num_hidden_layers
    assert len(assisted.scores) == len(assisted.attentions) == len(assisted.hidden_states) == 8
    for step in range(8):
        torch.testing.assert_close(assisted.scores[step], greedy.scores[step], atol=1e-4, rtol=1e-4)
        assert len(assisted.attentions[step]) == sliding and len(assisted.hidden_states[step]) == layers + 1


def test_self_speculative_draft_from_the_models_own_layers_equals_greedy(student, monkeypatch, one_thread):
    draft = layer_skip_draft(student, num_layers=2, num_assistant_tokens=DRAFT)
    draft.generation_config.assistant_confidence_threshold = 0.0
    assert draft.lm_head is student.lm_head and draft.model.language_model.layers[1] is \
        student.model.language_model.layers[1]
    ids, mask = _prompt(12, seed=2)
    expected = _greedy(student, ids, mask, 12)
    log = CropLog(monkeypatch)
    assert torch.equal(_greedy(student, ids, mask, 12, assistant_model=draft), expected)
    assert any(0 < r < DRAFT for rs in log.taken_back().values() for r in rs), "some drafts partly accepted"


def test_the_draft_is_fed_only_what_it_has_not_seen_even_without_a_mask(student, two_layer_draft, monkeypatch,
                                                                        one_thread):
    ids, mask = _prompt(12)
    expected = _greedy(student, ids, mask, 8)
    fed = []
    forward = type(two_layer_draft).forward
    monkeypatch.setattr(type(two_layer_draft), "forward",
                        lambda self, *a, **k: fed.append((self is two_layer_draft, k["input_ids"].shape[1]))
                        or forward(self, *a, **k))
    with torch.no_grad():
        got = student.generate(input_ids=ids, max_new_tokens=8, do_sample=False, assistant_model=two_layer_draft)
    assert torch.equal(got, expected)
    drafts = [n for is_draft, n in fed if is_draft]
    assert drafts[0] == 12 and max(drafts[1:]) <= 2, drafts


def test_prompt_lookup_equals_greedy(student, monkeypatch, one_thread):
    ids, mask = _prompt(20)
    head = _greedy(student, ids, mask, 10)[:, 20:]
    # the prompt repeats itself and holds the model's own continuation, so lookups are accepted and rejected
    prompt = torch.cat([ids[:, :8], ids[:, :8], ids[:, 8:], head], 1)
    mask = torch.ones_like(prompt)
    expected = _greedy(student, prompt, mask, 20)
    log = CropLog(monkeypatch)
    assert torch.equal(_greedy(student, prompt, mask, 20, prompt_lookup_num_tokens=DRAFT), expected)
    crops = [r for _, r, _ in log.calls]
    assert 0 in crops and any(r > 0 for r in crops), crops


def test_rollback_memory_does_not_grow_with_the_number_of_tokens(student, two_layer_draft, monkeypatch, one_thread):
    """Every layer's rollback journal stays within journal_limit(draft length) tokens, and the cache's bytes (ring,
    states and journals) peak at the same size over 20 new tokens as over 40."""
    ids, mask = _prompt(12)
    peaks, excess, peak_bytes = {}, [], []
    crop = InfiniteVLCache.crop

    def spy(cache, n):
        excess.extend(len(layer.journal) - journal_limit(cache.rollback_depth) for layer in cache.layers)
        peaks.setdefault(id(cache), []).append(cache.nbytes())
        return crop(cache, n)

    monkeypatch.setattr(InfiniteVLCache, "crop", spy)
    for n in (20, 40):
        peaks.clear()
        _greedy(student, ids, mask, n, assistant_model=two_layer_draft, num_assistant_tokens=DRAFT)
        peak_bytes.append(sorted(max(v) for v in peaks.values()))
    assert max(excess) <= 0 and peak_bytes[0] == peak_bytes[1]


@pytest.mark.gpu
def test_speculative_decoding_on_the_gpu_kernels_equals_greedy():
    """flash-linear-attention's kernels (head dims of 64: the fused recurrent step, the chunk kernel, in-kernel
    gates) under rollback: assisted decoding and prompt lookup give greedy's tokens, fp32."""
    teacher, _ = build_tiny_teacher(seed=0, hidden=256, heads=4, kv_heads=2, intermediate=512)
    torch.manual_seed(0)
    with torch.no_grad():
        for weight in teacher.parameters():
            if weight.dim() > 1:
                weight.normal_(0.0, 0.05)
    model = convert_from_qwen2_5_vl(teacher, sliding_window=8, init="random").cuda().eval()
    ids, mask = (t.cuda() for t in _prompt(40))
    expected = _greedy(model, ids, mask, 24)
    draft = layer_skip_draft(model, num_layers=4, num_assistant_tokens=DRAFT)
    draft.generation_config.assistant_confidence_threshold = 0.0
    assert torch.equal(_greedy(model, ids, mask, 24, assistant_model=draft), expected)
    assert torch.equal(_greedy(model, ids, mask, 24, prompt_lookup_num_tokens=DRAFT), expected)
