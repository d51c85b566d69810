"""lxt's CP-LRP (``variant="cp-lxt"``): CP-LRP with the gated MLP's gate held constant.

Checked against its definition (a tiny MLP by hand, the gradients on the bridge), for
conservation (both CP variants explain the logit difference exactly on bias-free llama)
and for being a different attribution from mechsteer's ``"cp"`` on gated MLPs only.
"""

import pytest
import torch
import torch.nn.functional as F

from mechsteer.attribution.lrp import attnlrp, lrp_rules, rules
from mechsteer.attribution.lrp.relevance import METHOD_NAMES, VARIANTS
from mechsteer.sites import hook_name, hooked
from mechsteer.tasks import ioi


@pytest.fixture(scope="module")
def data(tiny_gpt2, tiny_llama):
    return {id(m): ioi(m, n=6, template=1) for m in (tiny_gpt2, tiny_llama)}


def test_frozen_gate_rule_on_a_tiny_mlp_by_hand():
    """R(x) = x * W_in (act(x W_gate) * (W_out w)): all relevance through the up projection."""
    torch.manual_seed(0)
    d, m = 5, 7
    W_gate, W_in, W_out = torch.randn(d, m), torch.randn(d, m), torch.randn(m, d)
    x = torch.randn(3, d, requires_grad=True)
    w = torch.randn(3, d)
    gate, up = x @ W_gate, x @ W_in
    out = rules.frozen_gate_rule(gate, up, F.silu(gate) * up, rules.silu_ratio)
    torch.testing.assert_close(out, F.silu(gate) * up)  # value unchanged
    (g,) = torch.autograd.grad(out @ W_out, x, w)
    manual = ((F.silu(x @ W_gate) * (w @ W_out.T)) @ W_in.T).detach()  # gate a constant
    torch.testing.assert_close(g, manual)
    # conservation through the MLP: sum R(x) = sum R(out) = sum (out W_out) * w (no biases)
    torch.testing.assert_close((x * g).sum(), ((F.silu(gate) * up) @ W_out * w).sum())
    # mechsteer's "cp" gated rule gives half to the gate path instead
    half = rules.gated_rule(gate, up, F.silu(gate) * up, rules.silu_ratio)
    (g_up,) = torch.autograd.grad(half @ W_out, up, w, retain_graph=True)
    torch.testing.assert_close(g_up, 0.5 * F.silu(gate).detach() * (w @ W_out.T))


def test_gate_gets_no_gradient_on_the_bridge(tiny_llama):
    l, store = 1, {}
    names = [hook_name("mlp_pre", l), hook_name("mlp_pre_linear", l), hook_name("mlp_out", l)]

    def keep(n):
        def fn(x, hook):
            store[n] = x
        return fn

    leaf = (hook_name("embed"), lambda x, hook: x.detach().requires_grad_(True))
    with hooked(tiny_llama, [leaf, *[(n, keep(n)) for n in names]]), lrp_rules(tiny_llama, variant="cp-lxt"):
        tiny_llama(tiny_llama.to_tokens(["Hello there my friend"]))
    out = store[names[-1]]
    w = torch.randn_like(out)
    g_gate, g_up = torch.autograd.grad(out, [store[n] for n in names[:2]], w, allow_unused=True)
    d_post = w @ tiny_llama.blocks[l].mlp.W_out.T  # gradient arriving at hook_post
    assert g_gate is None or g_gate.abs().max() == 0
    torch.testing.assert_close(g_up, F.silu(store[names[0]].detach()) * d_post)


def test_values_are_unchanged(tiny):
    toks = tiny.to_tokens(["Hello there my friend"])
    with torch.no_grad():
        plain = tiny(toks)
    with lrp_rules(tiny, variant="cp-lxt"):
        ruled = tiny(toks)
    torch.testing.assert_close(ruled.detach(), plain)


@pytest.mark.parametrize("variant", ["cp", "cp-lxt"])
def test_both_cp_variants_are_exactly_conservative(tiny_llama, data, variant):
    ds = data[id(tiny_llama)]
    out = attnlrp(tiny_llama, ds, variant=variant, per_prompt=True, progress=False)
    f = out["input"].meta["target"]
    torch.testing.assert_close(out["input"].per_prompt.sum(-1), f, rtol=1e-4, atol=1e-5)
    resid = out["sites"].per_prompt.sum(-1)[:, 0]  # (B, layer) resid_pre: every cut carries f
    torch.testing.assert_close(resid, f[:, None].expand_as(resid), rtol=1e-4, atol=1e-5)
    assert out["input"].method == METHOD_NAMES[variant]


def test_they_differ_on_gated_mlps_only(tiny, data):
    ds = data[id(tiny)]
    cp = attnlrp(tiny, ds, variant="cp", per_prompt=True, progress=False)
    lxt = attnlrp(tiny, ds, variant="cp-lxt", per_prompt=True, progress=False)
    a, b = cp["input"].per_prompt, lxt["input"].per_prompt
    if tiny.cfg.gated_mlp:
        assert (a - b).abs().max() > 1e-3 * a.abs().max()
        assert (cp["heads"].per_prompt - lxt["heads"].per_prompt).abs().max() > 0
    else:  # GPT-2's MLP has no gate: lxt's CP-LRP is mechsteer's
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(cp["heads"].per_prompt, lxt["heads"].per_prompt)


def test_bad_variant_names_the_choices(tiny_llama, data):
    assert "cp-lxt" in VARIANTS
    with pytest.raises(ValueError, match="cp-lxt"):
        attnlrp(tiny_llama, data[id(tiny_llama)], variant="lxt", progress=False)


@pytest.mark.integration
def test_smollm2_cp_lxt_conserves(smollm2):
    ds = ioi(smollm2, n=2)
    out = attnlrp(smollm2, ds, variant="cp-lxt", readout="input", per_prompt=True, progress=False)
    torch.testing.assert_close(out.per_prompt.sum(-1), out.meta["target"], rtol=1e-4, atol=1e-4)
