"""KV-cache reuse (mechsteer.kv_cache): public-API caches, the bridge hand-over, and the
fallbacks, each forced here and checked to give the same numbers as the fast path."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache

from mechsteer import kv_cache
from mechsteer.attribution.patching import activation_patching
from mechsteer.fv.scores import aie
from mechsteer.interventions.generate import steered_generate
from mechsteer.interventions.scalars import DynScalar
from mechsteer.sites import live_hooks
from mechsteer.tasks import ioi
from mechsteer.tiny import tiny_hf_model, tiny_tokenizer

from test_fv_scores import make_prompts


def _force_problem(monkeypatch, why: str) -> None:
    monkeypatch.setattr(kv_cache, "reuse_problem", lambda past, n_prompts, n_pos: why)


def _kv_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "keys and values" in str(w.message) or "cached decoding" in str(w.message)]


def test_reuse_problem_names_why():
    assert "no KV cache" in kv_cache.reuse_problem(None, 2, 5)

    class MyCache(DynamicCache):
        pass

    assert "unknown cache class MyCache" in kv_cache.reuse_problem(MyCache(), 2, 5)
    empty = DynamicCache()
    assert "positions" in kv_cache.reuse_problem(empty, 2, 5)


def test_prefix_cache_slices_rows_and_positions(tiny):
    tokens = ioi(tiny, n=3).tokens
    with kv_cache.bridged(tiny):
        _, past = tiny(tokens, return_type="logits_and_cache")
    assert kv_cache.reuse_problem(past, 3, tokens.shape[1]) is None
    full = [(e[0].clone(), e[1].clone()) for e in past]
    c = kv_cache.PrefixCache(past).cache(torch.tensor([2, 0]), start=4, layer=1)
    got = [(e[0], e[1]) for e in c]
    assert got[0][0].shape[0] == 1 and got[0][0].shape[2] == 4  # skipped layer: a one-row placeholder
    torch.testing.assert_close(got[1][0], full[1][0][[2, 0], :, :4])
    torch.testing.assert_close(got[1][1], full[1][1][[2, 0], :, :4])
    for (k, v, *_), (k0, v0) in zip(past, full):  # the run's own cache is untouched
        assert torch.equal(k, k0) and torch.equal(v, v0)


@pytest.mark.parametrize("per_position", [True, False])
def test_patching_fallback_gives_the_same_numbers(tiny, monkeypatch, per_position):
    ds = ioi(tiny, n=4)
    fast = activation_patching(tiny, ds, site="attn_out", per_position=per_position, progress=False)
    assert fast.meta["reused_prefix"]
    _force_problem(monkeypatch, "unknown cache class FancyCache")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        slow = activation_patching(tiny, ds, site="attn_out", per_position=per_position, progress=False)
    assert not slow.meta["reused_prefix"]
    msgs = _kv_warnings(record)
    assert len(msgs) == 1 and "unknown cache class FancyCache" in msgs[0]
    torch.testing.assert_close(slow.scores, fast.scores, atol=1e-4, rtol=0)  # as the TL comparison
    assert live_hooks(tiny) == []


def test_fast_aie_fallback_equals_naive(tiny, monkeypatch):
    corr = make_prompts(tiny, corrupted=True)
    mz = 8.0 * torch.randn(tiny.cfg.n_layers, tiny.cfg.n_heads, tiny.cfg.d_head, generator=torch.Generator().manual_seed(1))
    naive = aie(tiny, corr, mz, mode="naive", per_prompt=True, progress=False)
    _force_problem(monkeypatch, "the model returned no KV cache")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fast = aie(tiny, corr, mz, mode="fast", per_prompt=True, progress=False)
    assert not fast.meta["reuse_prefix"]
    msgs = _kv_warnings(record)
    assert len(msgs) == 1 and "no KV cache" in msgs[0]
    torch.testing.assert_close(fast.per_prompt, naive.per_prompt, atol=1e-5, rtol=0)


def test_generation_fallback_decodes_uncached_with_one_warning(tiny_gpt2, monkeypatch):
    from mechsteer.models import bridge_hf

    model = bridge_hf("tiny-gpt2", tiny_hf_model("gpt2"), tiny_tokenizer())  # a fresh model: fresh check
    iv = DynScalar.for_model(model, sites=["mlp_out"])
    monkeypatch.setattr(kv_cache, "_decoding_problem", lambda m: "forced in a test")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        texts = [steered_generate(model, iv, "The capital of France is", beta=0.0, max_new_tokens=4) for _ in range(2)]
    msgs = _kv_warnings(record)
    assert len(msgs) == 1 and "forced in a test" in msgs[0]  # once per model
    plain = model.generate("The capital of France is", max_new_tokens=4, do_sample=False, verbose=False,
                           use_past_kv_cache=False)
    assert texts == [plain, plain]


def test_cached_decoding_works_on_the_tiny_models(tiny):
    assert kv_cache.cached_decoding_works(tiny)


def test_bridged_hands_the_cache_over_on_a_bare_bridge():
    """A bridge booted without mechsteer's processing: inside ``bridged`` cached decoding
    equals uncached decoding (outside it, TransformerLens 4.3 + transformers >= 5.24 differ)."""
    from transformer_lens.model_bridge import TransformerBridge

    hf = tiny_hf_model("llama")
    hf.config.architectures = [type(hf).__name__]
    bare = TransformerBridge.boot_transformers("tiny-llama", hf_model=hf, tokenizer=tiny_tokenizer())
    bare.enable_compatibility_mode(disable_warnings=True)
    tokens = bare.to_tokens("Mary and John went to the store")
    plain = bare.generate(tokens, max_new_tokens=6, do_sample=False, verbose=False, use_past_kv_cache=False)
    with kv_cache.bridged(bare):
        cached = bare.generate(tokens, max_new_tokens=6, do_sample=False, verbose=False)
    assert torch.equal(cached, plain)
    with pytest.raises(RuntimeError, match="boom"), kv_cache.bridged(bare):
        raise RuntimeError("boom")
    assert all(not b.attn._forward_pre_hooks for b in bare.blocks)  # removed, also after an exception


def test_shared_prefix_logits_equal_a_plain_forward(tiny):
    prefix = tiny.to_tokens("Give the opposite word of each input below")[0]  # (c,)
    tails = torch.randint(5, 200, (3, 4), generator=torch.Generator().manual_seed(0))
    tokens = torch.cat([prefix.expand(3, -1), tails], dim=1)  # (3, c + 4): rows share c tokens
    plain = tiny(tokens)[:, -1]
    shared = kv_cache.last_logits(tiny, tokens, share_prefix=True)
    torch.testing.assert_close(shared, plain, atol=1e-4, rtol=0)
    torch.testing.assert_close(kv_cache.last_logits(tiny, tokens), plain, atol=1e-5, rtol=0)
    assert live_hooks(tiny) == []


def test_top_k_with_a_shared_prefix_equals_plain(tiny_gpt2):
    from mechsteer.tasks.fv import fv_prompts, top_k_predictions

    p = fv_prompts(tiny_gpt2, "antonym", n=6, instructions=[0])  # rows share the instruction
    plain = top_k_predictions(tiny_gpt2, p, 3, progress=False)
    shared = top_k_predictions(tiny_gpt2, p, 3, progress=False, share_prefix=True)
    assert torch.equal(plain, shared)
