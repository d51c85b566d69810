"""Function-vector head scores: mean head activations, AIE (naive and fast), AttnLRP and
AtP head scores, global averaging and rank correlation."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import replace

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import mechsteer.fv.indirect_effect as aie_module
from mechsteer.attribution.lrp import attnlrp
from mechsteer.attribution.result import AttributionResult
from mechsteer.fv.means import last_z, mean_head_z
from mechsteer.fv.scores import (
    aie,
    aie_global,
    atp_head_scores,
    lrp_head_scores,
    rank_correlation,
)
from mechsteer.metrics import answer_prob as _answer_prob
from mechsteer.sites import hook_name, hooked, live_hooks
from mechsteer.tasks.fv import FVPrompts

PAIRS = [("hot", "cold"), ("tall", "short"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("old", "new")]
INSTRUCTION, FRAME = "Give the opposite word", "opposite"
answer_prob = functools.partial(_answer_prob, reduce="none")  # P(answer) per prompt, (batch,)
NOISE = "Blue river under a lamp"  # the corrupted prompts' stand-in for the instruction


def frame_positions(model, tokens, text: str, word: str) -> list[int]:
    """Positions of the tokens that overlap ``word`` in ``text`` (found from string tokens)."""
    strs = model.to_str_tokens(tokens)
    first = 1 if model.cfg.default_prepend_bos else 0
    start = text.index(word)
    out, at = [], 0
    for i, s in enumerate(strs[first:], first):
        if at < start + len(word) and at + len(s) > start:
            out.append(i)
        at += len(s)
    return out


def make_prompts(model, n: int = 4, corrupted: bool = False) -> FVPrompts:
    """Antonym instruction prompts built by hand (unequal lengths: several groups)."""
    pairs = PAIRS[:n]
    head = NOISE if corrupted else INSTRUCTION
    texts = [f"{head}\nQ: {a}\nA:" for a, _ in pairs]
    tokens = [model.to_tokens(t)[0] for t in texts]
    frames = [[] if corrupted else frame_positions(model, tok, t, FRAME) for tok, t in zip(tokens, texts)]
    answers = torch.tensor([model.to_tokens(" " + b, prepend_bos=False)[0, 0] for _, b in pairs])
    style = "instruction/corrupted" if corrupted else "instruction"
    return FVPrompts("antonym", style, texts, tokens, answers, frames, [0] * n, [a for a, _ in pairs],
                     [b for _, b in pairs])


@pytest.fixture(scope="module")
def far_mean():
    """A hand-set mean far from any head's output: every patch must move P(answer)."""
    return lambda model: 8.0 * torch.randn(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head,
                                           generator=torch.Generator().manual_seed(1))


def test_frames_found_by_hand(tiny_llama):
    p = make_prompts(tiny_llama)
    assert len({len(t) for t in p.tokens}) > 1  # several equal-length groups
    for tok, frame in zip(p.tokens, p.frames):
        assert "".join(tiny_llama.to_str_tokens(tok[frame])).strip() == FRAME


def test_mean_z_equals_a_manual_cache_mean(tiny):
    p = make_prompts(tiny)
    per_prompt = []
    for tok in p.tokens:  # one plain cached run per prompt, no batching
        _, cache = tiny.run_with_cache(tok[None], names_filter=lambda n: n.endswith("attn.hook_z"))
        per_prompt.append(torch.stack([cache[hook_name("z", l)][0, -1] for l in range(tiny.cfg.n_layers)]))
    expect = torch.stack(per_prompt).mean(0)
    torch.testing.assert_close(mean_head_z(tiny, p, progress=False), expect, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mean_head_z(tiny, p, batch_size=1, progress=False), expect, atol=1e-6, rtol=1e-5)
    assert live_hooks(tiny) == []


@pytest.mark.parametrize("layers,rows", [(None, None), (None, 5), ([1], 3)])
def test_naive_and_fast_aie_agree(tiny, far_mean, layers, rows):
    corr = make_prompts(tiny, corrupted=True)
    mz = far_mean(tiny)
    naive = aie(tiny, corr, mz, mode="naive", layers=layers, per_prompt=True, progress=False)
    fast = aie(tiny, corr, mz, mode="fast", layers=layers, rows=rows, per_prompt=True, progress=False)
    torch.testing.assert_close(fast.per_prompt, naive.per_prompt, atol=1e-5, rtol=0)
    scale = naive.per_prompt.abs().max()  # P(answer) is small on a random model: check relative too
    assert (fast.per_prompt - naive.per_prompt).abs().max() <= 1e-4 * scale
    n_layers = tiny.cfg.n_layers if layers is None else len(layers)
    assert fast.scores.shape == naive.scores.shape == (n_layers, tiny.cfg.n_heads)
    assert fast.meta["reuse_prefix"] and fast.meta["skip_blocks"]
    for r in (naive, fast):
        assert (r.axes, r.method, r.metric) == (("layer", "head"), "aie", "P(answer)")
        assert r.meta["samples_per_minute"] > 0 and r.seconds > 0
        torch.testing.assert_close(r.scores, r.per_prompt.mean(0))
    if layers is not None:
        assert fast.axis_labels("layer") == ["1"]


def test_every_head_patch_changes_p_and_its_hooks_fire(tiny, far_mean, monkeypatch):
    calls = []

    @contextlib.contextmanager
    def spy(model, fwd_hooks=(), bwd_hooks=(), **kw):
        with hooked(model, fwd_hooks, bwd_hooks, **kw) as counts:
            yield counts
        calls.append(dict(counts))

    monkeypatch.setattr(aie_module, "hooked", spy)
    corr = make_prompts(tiny, corrupted=True)
    for mode in ("naive", "fast"):
        calls.clear()
        r = aie(tiny, corr, far_mean(tiny), mode=mode, per_prompt=True, progress=False)
        assert (r.per_prompt.abs() > 1e-9).all(), f"{mode}: some head's patch left P(answer) unchanged"
        fired = [k for c in calls for k in c if "attn.hook_z" in k]
        assert all(c[k] >= 1 for c in calls for k in c)
        assert {k.split(":")[1] for k in fired} == {hook_name("z", l) for l in range(tiny.cfg.n_layers)}
    assert live_hooks(tiny) == []


@pytest.mark.parametrize("layer,head", [(0, 1), (1, 3)])
def test_cie_equals_manual_single_head_patches(tiny, far_mean, layer, head):
    corr = make_prompts(tiny, n=3, corrupted=True)
    mz = far_mean(tiny)
    r = aie(tiny, corr, mz, per_prompt=True, progress=False)
    W_O = tiny.blocks[layer].attn.W_O[head]  # (d_head, d_model)
    for n, tok in enumerate(corr.tokens):
        tok = tok[None]
        p0 = answer_prob(tiny(tok), corr.answers[n : n + 1])

        def set_z(z, hook):  # a new tensor, head `head` at the last position replaced
            z = z.clone()
            z[:, -1, head] = mz[layer, head]
            return z

        p_z = answer_prob(tiny.run_with_hooks(tok, fwd_hooks=[(hook_name("z", layer), set_z)]), corr.answers[n : n + 1])
        # independently of hook_z: the head's W_O-projected change added to attn_out
        shift = (mz[layer, head] - last_z(tiny, tok)[0, layer, head]) @ W_O

        def add_out(a, hook):
            a[:, -1] += shift
            return a

        p_o = answer_prob(tiny.run_with_hooks(tok, fwd_hooks=[(hook_name("attn_out", layer), add_out)]),
                          corr.answers[n : n + 1])
        torch.testing.assert_close(r.per_prompt[n, layer, head], (p_z - p0)[0], atol=1e-7, rtol=1e-4)
        torch.testing.assert_close(r.per_prompt[n, layer, head], (p_o - p0)[0], atol=1e-7, rtol=1e-4)


def test_atp_equals_the_linearisation(tiny, far_mean):
    """AtP = d/d eps P(y | z[-1] + eps (mean - z[-1])) at 0, per head (forward-mode AD), and
    approximates AIE for tiny perturbations (central finite differences)."""
    corr = make_prompts(tiny, n=1, corrupted=True)
    tok, ans = corr.tokens[0][None], corr.answers[:1]
    mz = far_mean(tiny)
    z = last_z(tiny, tok)[0]  # (L, H, d_head)
    atp = atp_head_scores(tiny, corr, mz, per_prompt=True, progress=False)
    assert (atp.axes, atp.method, atp.metric) == (("layer", "head"), "atp", "P(answer)")
    for layer in range(tiny.cfg.n_layers):
        for head in range(tiny.cfg.n_heads):
            with fwAD.dual_level():
                eps = fwAD.make_dual(torch.zeros(()), torch.ones(()))

                def move(x, hook):
                    x = x.clone()
                    x[:, -1, head] = x[:, -1, head] + eps * (mz[layer, head] - z[layer, head])
                    return x

                with hooked(tiny, [(hook_name("z", layer), move)]):
                    jvp = fwAD.unpack_dual(answer_prob(tiny(tok), ans)).tangent[0]
            torch.testing.assert_close(atp.scores[layer, head], jvp, atol=1e-9, rtol=1e-4)
    step = 1e-3  # AIE of means z +- step * (mean - z): (AIE+ - AIE-) / (2 step) -> AtP
    up = aie(tiny, corr, z + step * (mz - z), progress=False).scores
    down = aie(tiny, corr, z - step * (mz - z), progress=False).scores
    torch.testing.assert_close((up - down) / (2 * step), atp.scores, atol=2e-3 * atp.scores.abs().max(), rtol=2e-2)
    assert rank_correlation(aie(tiny, corr, z + step * (mz - z), progress=False), atp) > 0.95


def test_lrp_head_scores_and_the_rank_rule(tiny):
    p = make_prompts(tiny, n=4)
    logits = torch.stack([tiny(t[None])[0, -1] for t in p.tokens])  # (4, vocab)
    order = logits.argsort(-1, descending=True)
    # prompt 0: top token (rank 1), 1: rank 5 (kept), 2: rank 6 (skipped), 3: last (skipped)
    answers = torch.stack([order[0, 0], order[1, 4], order[2, 5], order[3, -1]])
    p = replace(p, answers=answers)
    r = lrp_head_scores(tiny, p, per_prompt=True, progress=False)
    assert (r.axes, r.method, r.metric) == (("layer", "head"), "attnlrp", "logit")
    assert r.scores.shape == (tiny.cfg.n_layers, tiny.cfg.n_heads)
    assert (r.meta["n_used"], r.meta["n_skipped"], r.meta["used"]) == (2, 2, [0, 1])
    assert (r.per_prompt >= 0).all() and (r.scores >= 0).all() and r.scores.sum() > 0
    assert r.meta["samples_per_minute"] > 0
    for row, n in zip(r.per_prompt, r.meta["used"]):  # the same as attnlrp on each prompt alone
        one = attnlrp(tiny, p.tokens[n][None], answer=answers[n : n + 1], readout="heads", key_pos=[p.frames[n]],
                      positive=True, progress=False)
        torch.testing.assert_close(row, one.scores, atol=1e-6, rtol=1e-4)
    assert lrp_head_scores(tiny, p, max_rank=6, progress=False).meta["n_used"] == 3
    with pytest.raises(ValueError, match="top 1"):
        lrp_head_scores(tiny, p.subset([2, 3]), max_rank=1, progress=False)
    with pytest.raises(ValueError, match="no intensional frame"):
        lrp_head_scores(tiny, make_prompts(tiny, corrupted=True), progress=False)
    assert live_hooks(tiny) == []


def test_global_average_and_rank_correlation(tiny_gpt2, far_mean):
    corr = make_prompts(tiny_gpt2, corrupted=True)
    mz = far_mean(tiny_gpt2)
    a = aie(tiny_gpt2, corr.subset([0, 1]), mz, progress=False)
    b = aie(tiny_gpt2, corr.subset([2, 3]), mz, progress=False)
    g = aie_global({"antonym": a, "other": b})
    assert g.axes == ("layer", "head") and g.scores.shape == a.scores.shape
    torch.testing.assert_close(g.scores, (a.scores + b.scores) / 2)
    assert g.meta["tasks"] == ["antonym", "other"] and g.meta["n_prompts"] == 4
    assert rank_correlation(a, a) == 1.0
    assert rank_correlation(a.scores, -a.scores) == -1.0
    with pytest.raises(ValueError, match="shape"):
        aie_global({"a": a, "b": aie(tiny_gpt2, corr, mz, layers=[0], progress=False)})
    with pytest.raises(ValueError, match="same layers"):
        rank_correlation(a, aie(tiny_gpt2, corr, mz, layers=[0], progress=False))


def test_bad_input_is_a_clear_error(tiny_gpt2):
    corr = make_prompts(tiny_gpt2, corrupted=True)
    mz = mean_head_z(tiny_gpt2, corr, progress=False)
    with pytest.raises(ValueError, match="mode must be"):
        aie(tiny_gpt2, corr, mz, mode="slow", progress=False)
    with pytest.raises(ValueError, match="mean_z has shape"):
        aie(tiny_gpt2, corr, mz[:1], progress=False)
    with pytest.raises(ValueError, match="layers must be"):
        aie(tiny_gpt2, corr, mz, layers=[5], progress=False)
    with pytest.raises(ValueError, match="empty"):
        mean_head_z(tiny_gpt2, corr.subset([]), progress=False)
    with pytest.raises(ValueError, match="rows must be"):
        aie(tiny_gpt2, corr, mz, rows=0, progress=False)
    with pytest.warns(UserWarning, match="not corrupted"):
        aie(tiny_gpt2, make_prompts(tiny_gpt2, n=1), mz, progress=False)
    assert live_hooks(tiny_gpt2) == []


@pytest.mark.integration
def test_smollm2_fast_aie_matches_naive_and_scores_run(smollm2):
    clean, corr = make_prompts(smollm2, n=3), make_prompts(smollm2, n=3, corrupted=True)
    assert all(len(f) >= 1 for f in clean.frames)
    mz = mean_head_z(smollm2, clean, progress=False)
    layers = [0, 14, 29]
    naive = aie(smollm2, corr, mz, mode="naive", layers=layers, per_prompt=True, progress=False)
    fast = aie(smollm2, corr, mz, mode="fast", layers=layers, per_prompt=True, progress=False)
    torch.testing.assert_close(fast.per_prompt, naive.per_prompt, atol=1e-5, rtol=0)
    assert fast.meta["reuse_prefix"] and naive.per_prompt.abs().max() > 1e-4
    # the hand-made prompts' answers rank 11th-20th on SmolLM2-135M: widen the rank rule
    lrp = lrp_head_scores(smollm2, clean, max_rank=100, progress=False)
    atp = atp_head_scores(smollm2, corr, mz, progress=False)
    assert lrp.scores.shape == atp.scores.shape == (30, 9) and (lrp.scores >= 0).all()
    assert (lrp.meta["n_used"], lrp.meta["n_skipped"]) == (3, 0)
    with pytest.raises(ValueError, match="top 5"):
        lrp_head_scores(smollm2, clean, progress=False)
