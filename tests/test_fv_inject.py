"""Function vectors: building (FV = sum mean_z @ W_O), injecting (FV / DFV) and evaluating."""

from __future__ import annotations

import pytest
import torch

from mechsteer.attribution.result import AttributionResult
from mechsteer.fv.evaluate import (
    best_layer,
    compare_injections,
    fv_layer_sweep,
    steered_continuations,
    zero_shot_accuracy,
)
from mechsteer.fv.inject import function_vector, inject_dfv, inject_fv, top_heads
from mechsteer.sites import HookNotFiredError, hooked, live_hooks
from mechsteer.tasks.fv import FVPrompts

TEXTS = ["The capital of France is", "Anne gave a book to", "Q: Paris\nA:", "Q: Rome\nA:", "Hello"]


def _tokens(model, text="The capital of France is"):
    return model.to_tokens(text)


def _mean_z(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head, generator=g)


def _prompts(model, texts=TEXTS, answers=None):
    """Hand-made FVPrompts of mixed lengths.

    Built without FVPrompts.__init__: its ``list[Int[Tensor, " pos"]]`` annotation binds one
    ``pos`` for the whole list under the suite's jaxtyping checks, so prompts of different
    lengths are refused until it reads ``" _pos"`` (reported to the owner of tasks/fv/prompts.py).
    """
    toks = [model.to_tokens(t)[0] for t in texts]
    n = len(texts)
    answers = torch.zeros(n, dtype=torch.long) if answers is None else answers
    values = dict(task="demo", style="zero_shot", texts=list(texts), tokens=toks, answers=answers,
                  frames=[[]] * n, instructions=[-1] * n, inputs=[""] * n, outputs=[""] * n, meta={})
    prompts = object.__new__(FVPrompts)
    for k, v in values.items():
        object.__setattr__(prompts, k, v)
    return prompts


def _add_at(name, vec, pos=-1):
    def fn(x, hook):
        x = x.clone()
        x[:, pos] += vec.to(x)
        return x

    return [(name, fn)]


# --- head selection and the FV itself ----------------------------------------------
def test_top_heads_order_ties_and_errors():
    s = torch.tensor([[0.2, 0.7, 0.7], [0.7, -0.9, 0.0]])
    r = AttributionResult(s, ("layer", "head"), "demo")
    assert top_heads(r, k=4) == [(0, 1), (0, 2), (1, 0), (0, 0)]  # ties in (layer, head) order
    assert top_heads(r, k=1, by="abs") == [(1, 1)]
    flipped = AttributionResult(s.T.clone(), ("head", "layer"), "demo")
    assert top_heads(flipped, k=4) == top_heads(r, k=4)
    with pytest.raises(ValueError, match="out of range"):
        top_heads(r, k=7)
    with pytest.raises(ValueError, match="axes"):
        top_heads(AttributionResult(torch.zeros(2, 3), ("layer", "pos"), "demo"))
    with pytest.raises(ValueError, match="NaN"):
        top_heads(AttributionResult(torch.tensor([[float("nan")]]), ("layer", "head"), "demo"), k=1)


def test_function_vector_is_sum_of_head_outputs(tiny):
    mean_z = _mean_z(tiny)
    heads = [(0, 1), (1, 3), (1, 0)]
    manual = torch.zeros(tiny.cfg.d_model)
    for l, h in heads:
        manual += mean_z[l, h] @ tiny.blocks[l].attn.W_O[h]
    torch.testing.assert_close(function_vector(tiny, mean_z, heads), manual, atol=1e-6, rtol=1e-6)


def test_bad_inputs_raise(tiny_gpt2):
    m, mean_z = tiny_gpt2, _mean_z(tiny_gpt2)
    with pytest.raises(ValueError, match="out of range"):
        function_vector(m, mean_z, [(5, 0)])
    with pytest.raises(ValueError, match="duplicates"):
        function_vector(m, mean_z, [(0, 0), (0, 0)])
    with pytest.raises(ValueError, match="empty"):
        function_vector(m, mean_z, [])
    with pytest.raises(ValueError, match="mean_z has shape"):
        function_vector(m, mean_z[:1], [(0, 0)])
    with pytest.raises(ValueError, match="mode"):
        with inject_dfv(m, mean_z, [(0, 0)], mode="swap"):
            pass
    with pytest.raises(ValueError, match="fv has shape"):
        with inject_fv(m, torch.zeros(3), 0):
            pass
    with pytest.raises(ValueError, match="Layer"):
        with inject_fv(m, torch.zeros(64), 9):
            pass


# --- injection equivalences ----------------------------------------------------------
@pytest.mark.parametrize("layer", [0, 1])
def test_dfv_all_heads_equals_adding_their_output_at_attn_out(tiny, layer):
    """No post-attention norm on either tiny model: z -> attn_out is linear in each head."""
    tokens, mean_z = _tokens(tiny), _mean_z(tiny)
    heads = [(layer, h) for h in range(tiny.cfg.n_heads)]
    with inject_dfv(tiny, mean_z, heads, scale=0.7):
        dfv = tiny(tokens)
    out = 0.7 * function_vector(tiny, mean_z, heads)
    with hooked(tiny, _add_at(f"blocks.{layer}.hook_attn_out", out)):
        ref = tiny(tokens)
    torch.testing.assert_close(dfv, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dfv[0, -1], tiny(tokens)[0, -1])


def test_fv_equals_adding_at_mlp_out_and_next_resid_pre(tiny):
    tokens, fv = _tokens(tiny), 3 * function_vector(tiny, _mean_z(tiny), [(0, 1), (1, 2)])
    with inject_fv(tiny, fv, 0, scale=0.5):
        steered = tiny(tokens)
    for name in ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre"]:
        with hooked(tiny, _add_at(name, 0.5 * fv)):
            torch.testing.assert_close(steered, tiny(tokens), atol=1e-5, rtol=1e-5)


def test_scale_zero_is_exactly_the_identity(tiny):
    tokens, mean_z = _tokens(tiny), _mean_z(tiny)
    clean = tiny(tokens)
    fv = function_vector(tiny, mean_z, [(0, 0), (1, 1)])
    for ctx in [
        inject_fv(tiny, fv, 1, scale=0),
        inject_dfv(tiny, mean_z, [(0, 0), (1, 1)], scale=0.0),
        inject_dfv(tiny, mean_z, [(0, 0), (1, 1)], scale=0.0, mode="replace"),
    ]:
        with ctx:
            assert torch.equal(tiny(tokens), clean)


def test_injection_steers_the_last_position_only(tiny):
    tokens, mean_z = _tokens(tiny), _mean_z(tiny)
    clean = tiny(tokens)
    fv = function_vector(tiny, mean_z, [(0, 0), (1, 1)])
    for ctx, hook in [
        (inject_fv(tiny, fv, 0), "fwd:blocks.0.hook_resid_post"),
        (inject_dfv(tiny, mean_z, [(0, 2)]), "fwd:blocks.0.attn.hook_z"),
        (inject_dfv(tiny, mean_z, [(1, 2)], mode="replace"), "fwd:blocks.1.attn.hook_z"),
    ]:
        with ctx as calls:
            steered = tiny(tokens)
        assert calls[hook] == 1
        assert torch.equal(steered[:, :-1], clean[:, :-1])  # causal: earlier positions untouched
        assert (steered[:, -1] - clean[:, -1]).abs().max() > 1e-3


def test_one_token_prompt_is_steered(tiny):
    tokens = _tokens(tiny)[:, :1]
    fv = 5 * function_vector(tiny, _mean_z(tiny), [(0, 0)])
    with inject_fv(tiny, fv, 0):
        steered = tiny(tokens)
    assert (steered - tiny(tokens)).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_replace_sets_z(tiny, scale):
    tokens, mean_z = _tokens(tiny), _mean_z(tiny)
    heads, seen = [(1, 0), (1, 3)], {}
    with hooked(tiny, [("blocks.1.attn.hook_z", lambda z, hook: seen.__setitem__("clean", z.clone()))]):
        tiny(tokens)
    with inject_dfv(tiny, mean_z, heads, scale=scale, mode="replace"):
        with hooked(tiny, [("blocks.1.attn.hook_z", lambda z, hook: seen.__setitem__("after", z.clone()))]):
            tiny(tokens)
    clean, after = seen["clean"], seen["after"]  # (1, T, H, d_head)
    want = clean[:, -1, [0, 3]] + scale * (mean_z[1, [0, 3]] - clean[:, -1, [0, 3]])
    assert torch.equal(after[:, -1, [0, 3]], want)
    assert torch.equal(after[:, -1, [1, 2]], clean[:, -1, [1, 2]])
    assert torch.equal(after[:, :-1], clean[:, :-1])


# --- scoping ---------------------------------------------------------------------------
def test_no_live_hooks_after_exit_and_after_exceptions(tiny):
    tokens, mean_z = _tokens(tiny), _mean_z(tiny)
    fv = function_vector(tiny, mean_z, [(0, 0)])
    for make in [lambda: inject_fv(tiny, fv, 1), lambda: inject_dfv(tiny, mean_z, [(0, 0), (1, 2)])]:
        with make():
            tiny(tokens)
        assert live_hooks(tiny) == []
        with pytest.raises(RuntimeError, match="boom"):
            with make():
                tiny.generate(tokens, max_new_tokens=2, do_sample=False, verbose=False)
                raise RuntimeError("boom")
        assert live_hooks(tiny) == []
        with pytest.raises(HookNotFiredError):
            with make():
                pass  # no run inside the block: the injection would be a silent no-op
        assert live_hooks(tiny) == []


# --- generation -----------------------------------------------------------------------
def _gen(model, tokens, n=6, cache=True):
    return model.generate(tokens, max_new_tokens=n, do_sample=False, verbose=False, use_past_kv_cache=cache)


def _manual_positions(name, vec, prompt_len, every_step):
    """Reference without a KV cache: steer absolute positions prompt_len-1 (.. and later)."""

    def fn(x, hook):
        x = x.clone()
        if every_step:
            x[:, prompt_len - 1 :] += vec.to(x)
        else:
            x[:, prompt_len - 1] += vec.to(x)
        return x

    return [(name, fn)]


def test_generate_scale_zero_equals_plain_generate(tiny):
    tokens, mean_z = _tokens(tiny), _mean_z(tiny)
    fv = function_vector(tiny, mean_z, [(0, 0)])
    plain = _gen(tiny, tokens)
    for every_step in [False, True]:
        with inject_fv(tiny, fv, 0, scale=0, every_step=every_step):
            assert torch.equal(_gen(tiny, tokens), plain)
        with inject_dfv(tiny, mean_z, [(1, 1)], scale=0, every_step=every_step):
            assert torch.equal(_gen(tiny, tokens), plain)


@pytest.mark.parametrize("every_step", [False, True])
def test_cached_generation_steers_the_documented_positions(tiny, every_step):
    tokens, T = _tokens(tiny), _tokens(tiny).shape[1]
    fv = 8 * function_vector(tiny, _mean_z(tiny), [(0, 0), (0, 1), (1, 1)])
    with inject_fv(tiny, fv, 0, every_step=every_step) as calls:
        steered = _gen(tiny, tokens)
    assert calls["fwd:blocks.0.hook_resid_post"] == 6  # one prompt pass + 5 cached steps
    with hooked(tiny, _manual_positions("blocks.0.hook_resid_post", fv, T, every_step)):
        ref = _gen(tiny, tokens, cache=False)
    assert torch.equal(steered, ref)
    assert not torch.equal(steered, _gen(tiny, tokens))  # the test is not vacuous


def test_every_step_matters_in_generation(tiny_llama):
    tokens, mean_z = _tokens(tiny_llama), 4 * _mean_z(tiny_llama)
    heads = [(0, 0), (0, 1), (1, 2), (1, 3)]
    with inject_dfv(tiny_llama, mean_z, heads) as calls:
        once = _gen(tiny_llama, tokens, n=8)
    with inject_dfv(tiny_llama, mean_z, heads, every_step=True):
        every = _gen(tiny_llama, tokens, n=8)
    assert calls["fwd:blocks.1.attn.hook_z"] == 8
    assert torch.equal(once[:, : tokens.shape[1] + 1], every[:, : tokens.shape[1] + 1])  # same first token
    assert not torch.equal(once, every)


# --- evaluation -----------------------------------------------------------------------
def _manual_accuracy(model, prompts, k):
    hits = 0
    for toks, ans in zip(prompts.tokens, prompts.answers):
        last = model(toks[None])[0, -1]
        hits += int(ans in last.topk(k).indices)
    return hits / len(prompts)


def test_zero_shot_accuracy_equals_a_manual_count(tiny):
    argmax = torch.tensor([int(tiny(tiny.to_tokens(t))[0, -1].argmax()) for t in TEXTS])
    answers = argmax.clone()
    answers[[1, 3]] = torch.tensor([7, 9])  # two prompts wrong (or at best top-3)
    prompts = _prompts(tiny, answers=answers)
    r = zero_shot_accuracy(tiny, prompts, batch_size=2, progress=False)
    assert r["n"] == len(TEXTS) and r["top1"] == _manual_accuracy(tiny, prompts, 1)
    assert r["top3"] == _manual_accuracy(tiny, prompts, 3)
    assert r["rank"][[0, 2, 4]].tolist() == [0, 0, 0]
    fv = 10 * function_vector(tiny, _mean_z(tiny), [(0, 0), (1, 1)])
    steered = zero_shot_accuracy(tiny, prompts, lambda: inject_fv(tiny, fv, 0), topk=(1, 5), progress=False)
    with inject_fv(tiny, fv, 0):
        assert steered["top5"] == _manual_accuracy(tiny, prompts, 5)
        assert steered["top1"] == _manual_accuracy(tiny, prompts, 1)


def test_sweep_best_layer_and_comparison_table(tiny_gpt2):
    m, mean_z = tiny_gpt2, _mean_z(tiny_gpt2)
    prompts = _prompts(m)
    fv = function_vector(m, mean_z, [(0, 1), (1, 2)])
    sweep = fv_layer_sweep(m, fv, prompts, progress=False)
    assert sweep["layer"].tolist() == [0, 1]
    assert list(sweep.columns) == ["layer", "top1", "top3", "n", "correct", "top1_lo", "top1_hi"]
    for l in range(2):
        want = zero_shot_accuracy(m, prompts, lambda: inject_fv(m, fv, l), progress=False)["top1"]
        assert sweep["top1"][l] == want
    import pandas as pd

    tie = pd.DataFrame({"layer": [0, 1, 2], "top1": [0.5, 0.5, 0.1], "top3": [0.6, 0.9, 1.0]})
    assert best_layer(tie) == 1 and best_layer(tie, by="top3") == 2
    df = compare_injections(m, prompts, mean_z, {"a": [(0, 1)], "b": [(1, 2), (0, 3)]}, {"a": 0, "b": 1}, progress=False)
    assert df["name"].tolist() == ["baseline", "fv/a", "dfv/a", "fv/b", "dfv/b"]
    assert df["n_heads"].tolist() == [0, 1, 1, 2, 2]
    assert df.loc[0, "top1"] == zero_shot_accuracy(m, prompts, progress=False)["top1"]
    with pytest.raises(ValueError, match="No FV layer"):
        compare_injections(m, prompts, mean_z, {"a": [(0, 1)]}, {}, progress=False)


def test_steered_continuations(tiny_gpt2):
    m, fv = tiny_gpt2, 10 * function_vector(tiny_gpt2, _mean_z(tiny_gpt2), [(0, 0)])
    prompt = "Q: Paris A:"
    df = steered_continuations(
        m, prompt, {"zero": lambda: inject_fv(m, fv, 0, scale=0), "fv": lambda: inject_fv(m, fv, 0, every_step=True)}, 5
    )
    tokens = m.to_tokens(prompt)
    plain = m.tokenizer.decode(_gen(m, tokens, n=5)[0, tokens.shape[1] :].tolist(), skip_special_tokens=True)
    assert df["name"].tolist() == ["baseline", "zero", "fv"]
    assert df["text"][0] == plain and df["text"][1] == plain
    assert df["text"][2] != plain
    assert live_hooks(m) == []


# --- integration -------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_fv_and_dfv(smollm2):
    m = smollm2
    texts = ["Q: hot\nA:", "Q: big\nA:", "Q: fast\nA:"]
    zs = []
    for t in texts:
        with hooked(m, [(f"blocks.{l}.attn.hook_z", lambda z, hook, l=l: zs.append((l, z[0, -1]))) for l in range(m.cfg.n_layers)]):
            m(m.to_tokens(t))
    mean_z = torch.stack([torch.stack([z for l2, z in zs if l2 == l]).mean(0) for l in range(m.cfg.n_layers)])
    assert mean_z.shape == (30, 9, 64)
    tokens = m.to_tokens("Q: cold\nA:")
    heads = [(12, h) for h in range(9)]
    with inject_dfv(m, mean_z, heads):
        dfv = m(tokens)
    with hooked(m, _add_at("blocks.12.hook_attn_out", function_vector(m, mean_z, heads))):
        ref = m(tokens)
    torch.testing.assert_close(dfv, ref, atol=1e-4, rtol=1e-4)
    fv = function_vector(m, mean_z, [(10, 2), (12, 5), (14, 1)])
    plain = _gen(m, tokens, n=4)
    with inject_fv(m, fv, 10, scale=0):
        assert torch.equal(_gen(m, tokens, n=4), plain)
    prompts = _prompts(m, texts[:2], answers=torch.tensor([0, 0]))
    r = zero_shot_accuracy(m, prompts, lambda: inject_dfv(m, mean_z, [(10, 2)], every_step=True), progress=False)
    assert r["n"] == 2 and live_hooks(m) == []


def test_wilson_matches_published_values():
    """Wilson 95% intervals as tabulated by Newcombe (1998, Stat. Med. 17:857, Table I):
    81/263 -> (0.2553, 0.3662); 15/148 -> (0.0624, 0.1605); 0/20 -> (0, 0.1611); 1/29 -> (0.0061, 0.1718)."""
    from mechsteer.fv.stats import wilson

    for (k, n), want in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611),
                         (1, 29): (0.0061, 0.1718)}.items():
        assert wilson(k, n) == pytest.approx(want, abs=6e-5)
    with pytest.raises(ValueError, match="k=11, n=10"):
        wilson(11, 10)
    with pytest.raises(ValueError, match="n must be a count"):
        wilson(1, -3)


def test_paired_gain_interval_properties():
    """Newcombe's paired interval: holds the gain, widens with fewer items, flips sign with
    the roles swapped, and is above zero for a clear win (12 wins, 0 losses of 50)."""
    from mechsteer.fv.stats import newcombe_paired

    g, lo, hi = newcombe_paired(20, 12, 0, 18)
    assert g == pytest.approx(12 / 50) and 0 < lo < g < hi
    g2, lo2, hi2 = newcombe_paired(20, 0, 12, 18)
    assert (g2, lo2, hi2) == pytest.approx((-g, -hi, -lo))
    _, lo_small, hi_small = newcombe_paired(4, 3, 0, 3)
    assert hi_small - lo_small > hi - lo
    assert newcombe_paired(14, 5, 0, 22) == pytest.approx((5 / 41, 0.0115, 0.2265), abs=1e-4)  # Altman et al. Table 6.2 counts


def test_comparison_table_intervals_are_paired_over_items(tiny_gpt2):
    """wins / losses count the items each injection gets right where the baseline does not
    (and vice versa), from the same per-item ranks as zero_shot_accuracy."""
    from mechsteer.fv.stats import interval_columns

    m, mean_z = tiny_gpt2, _mean_z(tiny_gpt2)
    prompts = _prompts(m)
    df = compare_injections(m, prompts, mean_z, {"a": [(0, 1), (1, 2)]}, {"a": 1}, scale=20, progress=False)
    base = zero_shot_accuracy(m, prompts, progress=False)["rank"] < 1
    fv = zero_shot_accuracy(m, prompts, lambda: inject_fv(m, function_vector(m, mean_z, [(0, 1), (1, 2)]), 1, 20),
                            progress=False)["rank"] < 1
    row = df.set_index("name").loc["fv/a"]
    assert row["n"] == len(prompts) and row["wins"] == int((fv & ~base).sum()) and row["losses"] == int((~fv & base).sum())
    want = interval_columns(len(prompts), int(fv.sum()), int((fv & ~base).sum()), int((~fv & base).sum()))
    assert row[list(want)].tolist() == pytest.approx(list(want.values()))
    b = df.set_index("name").loc["baseline"]
    assert (b["gain"], b["wins"], b["losses"]) == (0.0, 0, 0)
