"""AttnLRP: rules checked against their definitions, readouts against torch.autograd."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from mechsteer.attribution.lrp import attnlrp, lrp_rules, rules
from mechsteer.sites import hook_name, hooked, live_hooks
from mechsteer.tasks import ioi

SITES = ("resid_pre", "attn_out", "mlp_out", "resid_post")


@pytest.fixture(scope="module")
def data(tiny_gpt2, tiny_llama):
    return {id(m): ioi(m, n=6, template=1) for m in (tiny_gpt2, tiny_llama)}


def leaf_at_embed():
    """A forward hook making the embeddings a leaf (parameters do not ask for gradient)."""
    return ("hook_embed", lambda x, hook: x.detach().requires_grad_(True))


def capture(names, store):
    """Forward hooks storing the tensor at each name (as it is *before* later hooks there)."""
    def keep(name):
        def fn(x, hook):
            store[name] = x
        return fn
    return [(n, keep(n)) for n in names]


def logit_diff(logits, ds):
    f = logits[:, -1].float()
    i = torch.arange(len(f))
    return f[i, ds.correct] - f[i, ds.wrong]


def rel(x, g):
    return (x.detach().float() * g.float()).sum(-1)


# ---- (1) with every rule off: gradient x input, against torch.autograd ------------------
def test_rules_off_is_gradient_times_input(tiny, data):
    ds = data[id(tiny)]
    L, q, keys = tiny.cfg.n_layers, -2, [1, 3, 4]
    names = {"embed": "hook_embed"} | {(s, l): hook_name(s, l) for s in SITES for l in range(L)}
    names |= {("pattern", l): f"blocks.{l}.attn.hook_pattern" for l in range(L)}
    store = {}
    with torch.enable_grad(), hooked(tiny, [leaf_at_embed(), *capture(names.values(), store)]):
        target = logit_diff(tiny(ds.tokens), ds)
    acts = [store[n] for n in names.values()]
    grads = dict(zip(names, torch.autograd.grad(target.sum(), acts)))
    got = attnlrp(tiny, ds, rules=False, query_pos=q, key_pos=keys, per_prompt=True, progress=False)
    torch.testing.assert_close(got["input"].meta["target"], target.detach())
    torch.testing.assert_close(got["input"].per_prompt, rel(store["hook_embed"], grads["embed"]))
    for i, s in enumerate(SITES):
        for l in range(L):
            expect = rel(store[names[s, l]], grads[s, l])
            torch.testing.assert_close(got["sites"].per_prompt[:, i, l], expect, atol=1e-6, rtol=1e-5)
    for l in range(L):
        a, g = store[names["pattern", l]].detach(), grads["pattern", l]
        expect = (a * g)[:, :, q][..., keys].sum(-1)  # (B, H): A * dA, query q, keys summed
        torch.testing.assert_close(got["heads"].per_prompt[:, l], expect, atol=1e-7, rtol=1e-5)


# ---- (2) CP-LRP is exactly conservative on a bias-free model ----------------------------
def test_cp_lrp_is_exactly_conservative_without_biases(tiny_llama, data):
    assert not [n for n, _ in tiny_llama.original_model.named_parameters() if "bias" in n]
    ds = data[id(tiny_llama)]
    out = attnlrp(tiny_llama, ds, variant="cp", per_prompt=True, progress=False)
    f = out["input"].meta["target"]
    torch.testing.assert_close(out["input"].per_prompt.sum(-1), f, rtol=1e-4, atol=1e-5)
    # layer by layer too: every residual-stream cut carries the whole logit difference
    per_layer = out["sites"].per_prompt.sum(-1)  # (B, site, layer)
    for s in ("resid_pre", "resid_post"):
        i = SITES.index(s)
        torch.testing.assert_close(per_layer[:, i], f[:, None].expand_as(per_layer[:, i]), rtol=1e-4, atol=1e-5)


# ---- (3) each rule's hook fires once per layer ---------------------------------------
@pytest.mark.parametrize("variant,uniform", [("attnlrp", "qk"), ("attnlrp", "pattern"), ("cp", "qk")])
def test_each_rule_fires_once_per_layer(tiny, variant, uniform):
    with lrp_rules(tiny, variant=variant, uniform=uniform) as calls:
        tiny(tiny.to_tokens(["Hello there", "General Kenobi"]))
    attn = {"qk": ["q", "k", "v"], "pattern": ["q", "k", "pattern", "v"]}[uniform]
    attn = attn if variant == "attnlrp" else ["pattern"]
    mlp = ["pre", "pre_linear", "post"] if tiny.cfg.gated_mlp else ["pre", "post"]
    expect = {"fwd:ln_final.hook_scale"}
    for l in range(tiny.cfg.n_layers):
        expect |= {f"fwd:blocks.{l}.ln1.hook_scale", f"fwd:blocks.{l}.ln2.hook_scale"}
        expect |= {f"fwd:blocks.{l}.attn.hook_{s}" for s in attn} | {f"fwd:blocks.{l}.mlp.hook_{s}" for s in mlp}
    assert set(calls) == expect
    assert set(calls.values()) == {1}


def test_rules_keep_every_value(tiny):
    tokens = tiny.to_tokens(["The quick brown fox jumps over the lazy dog"])
    plain = tiny(tokens)
    for variant in ("attnlrp", "cp"):
        with lrp_rules(tiny, variant=variant):
            torch.testing.assert_close(tiny(tokens), plain, atol=2e-5, rtol=1e-5)


# ---- (4) the two placements of the uniform rule give the same numbers --------------------
def test_uniform_rule_placements_agree(tiny, data):
    ds = data[id(tiny)]
    a = attnlrp(tiny, ds, uniform="qk", key_pos=[0, 2], per_prompt=True, progress=False)
    b = attnlrp(tiny, ds, uniform="pattern", key_pos=[0, 2], per_prompt=True, progress=False)
    for k in a:
        torch.testing.assert_close(a[k].per_prompt, b[k].per_prompt, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant,uniform", [("attnlrp", "qk"), ("attnlrp", "pattern"), ("cp", "qk")])
def test_uniform_rule_scales_q_k_v_gradients(tiny_llama, variant, uniform):
    """Into q and k 1/4 of the plain gradient (both products on the path), into v 1/2;
    CP-LRP: nothing into q and k, the plain gradient into v."""
    tokens, l = tiny_llama.to_tokens(["Hello there my friend"]), 1
    names = [f"blocks.{l}.attn.hook_{s}" for s in "qkv"] + [hook_name("attn_out", l)]
    grads = {}
    for on in (True, False):
        store = {}
        with hooked(tiny_llama, [leaf_at_embed(), *capture(names, store)]), \
                lrp_rules(tiny_llama, variant=variant, uniform=uniform, rules=on):
            tiny_llama(tokens)
        out = store[names[-1]]
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        got = torch.autograd.grad(out, [store[n] for n in names[:3]], w, allow_unused=True)
        grads[on] = [torch.zeros_like(store[n]) if g is None else g for n, g in zip(names, got)]
    factors = (0.0, 0.0, 1.0) if variant == "cp" else (0.25, 0.25, 0.5)
    for g_on, g_off, s in zip(grads[True], grads[False], factors):
        torch.testing.assert_close(g_on, s * g_off)


# ---- (5) identity rule: gradient act(x)/x, finite at 0 ----------------------------------
@pytest.mark.parametrize("name,act", [
    ("silu", F.silu), ("gelu", F.gelu), ("gelu_new", lambda x: F.gelu(x, approximate="tanh")), ("relu", F.relu),
])
def test_identity_rule_gradient_is_act_over_x(name, act):
    x = torch.tensor([-6.0, -1.5, -1e-3, 0.0, 1e-3, 0.7, 3.0, 8.0], dtype=torch.float64, requires_grad=True)
    y = rules.identity_rule(x, act(x), rules.ACT_RATIOS[name])
    assert torch.equal(y, act(x))  # value-identical
    (g,) = torch.autograd.grad(y.sum(), x)
    nz = x != 0
    torch.testing.assert_close(g[nz], (act(x) / x)[nz].detach())
    assert torch.isfinite(g).all() and g[~nz].item() == (0.0 if name == "relu" else 0.5)


def test_silu_and_gelu_identity_and_gpt2_activation():
    from transformers.activations import NewGELUActivation

    x = torch.linspace(-4, 4, 9, requires_grad=True)
    torch.testing.assert_close(NewGELUActivation()(x), F.gelu(x, approximate="tanh"))  # gpt2's gelu_new
    tanh_gelu = lambda t: rules.gelu_identity(t, "tanh")  # noqa: E731
    for fn, ratio in [(rules.silu_identity, torch.sigmoid), (tanh_gelu, rules.gelu_tanh_ratio)]:
        (g,) = torch.autograd.grad(fn(x).sum(), x)
        torch.testing.assert_close(g, ratio(x).detach())
    with pytest.raises(ValueError, match="approximate"):
        rules.gelu_identity(x, "fast")


def test_mlp_rules_on_the_bridge(tiny):
    """gpt2: d/dpre = ratio(pre) * dpost. Gated llama: d/dgate = ratio(g) u / 2, d/dup = act(g) / 2."""
    l, store = 1, {}
    names = [f"blocks.{l}.mlp.hook_pre", f"blocks.{l}.mlp.hook_pre_linear", hook_name("mlp_out", l)]
    names = names if tiny.cfg.gated_mlp else [names[0], names[2]]
    with hooked(tiny, [leaf_at_embed(), *capture(names, store)]), lrp_rules(tiny):
        tiny(tiny.to_tokens(["Hello there my friend"]))
    out = store[names[-1]]
    w = torch.randn_like(out)
    grads = torch.autograd.grad(out, [store[n] for n in names[:-1]], w)
    d_post = w @ tiny.blocks[l].mlp.W_out.T  # gradient arriving at hook_post
    pre = store[names[0]].detach()
    ratio = rules.ACT_RATIOS[tiny.cfg.act_fn](pre)
    if tiny.cfg.gated_mlp:
        up = store[names[1]].detach()
        torch.testing.assert_close(grads[0], 0.5 * ratio * up * d_post)
        torch.testing.assert_close(grads[1], 0.5 * F.silu(pre) * d_post)
    else:
        torch.testing.assert_close(grads[0], ratio * d_post)


def test_norm_rule_detaches_the_normaliser(tiny):
    """With hook_scale frozen the bridge's norm is linear: relevance passes through it
    unchanged, x . dx = (y - b) . dy. The plain gradient keeps only eps / scale^2 of it."""
    l, store = 1, {}
    names = [f"blocks.{l}.ln2.hook_in", f"blocks.{l}.ln2.hook_scale", f"blocks.{l}.ln2.hook_out"]
    ln = tiny.blocks[l].ln2
    bias = ln.original_component.bias if getattr(ln.original_component, "bias", None) is not None else 0.0
    eps = getattr(ln.original_component, "eps", None) or ln.original_component.variance_epsilon
    for on in (True, False):
        with hooked(tiny, [leaf_at_embed(), *capture(names, store)]), lrp_rules(tiny, rules=on):
            tiny(tiny.to_tokens(["Hello there my friend"]))
        x, scale, y = (store[n] for n in names)
        w = torch.randn_like(y)
        (g,) = torch.autograd.grad(y, x, w)
        r_in, r_out = rel(x, g), rel(y - bias, w)
        share = 1.0 if on else eps / scale.detach()[..., 0] ** 2
        torch.testing.assert_close(r_in, share * r_out, atol=1e-5 * r_out.abs().max().item(), rtol=1e-4)


# ---- (6) AttnLRP: only the softmax leaks relevance ---------------------------------------
def test_attnlrp_loses_relevance_only_at_the_softmax(tiny_llama, data):
    """On a bias-free model, per layer: sum R(resid_mid) - sum R(resid_pre) equals what the
    attention weights receive (A's half of A.V) minus what the softmax passes on to the
    scores, i.e. the softmax's gradient x input is the only non-conservative step."""
    model, ds = tiny_llama, data[id(tiny_llama)]
    L, store = model.cfg.n_layers, {}
    kinds = {"pre": "blocks.{}.hook_resid_pre", "mid": "blocks.{}.hook_resid_mid",
             "A": "blocks.{}.attn.hook_pattern", "S": "blocks.{}.attn.hook_attn_scores"}
    names = [k.format(l) for l in range(L) for k in kinds.values()]
    with hooked(model, [leaf_at_embed(), *capture(names, store)]), lrp_rules(model, uniform="pattern"):
        target = logit_diff(model(ds.tokens), ds)
    grads = dict(zip(names, torch.autograd.grad(target.sum(), [store[n] for n in names])))

    def R(kind, l):
        n = kinds[kind].format(l)
        x = store[n].detach()
        return torch.where(torch.isfinite(x), x * grads[n], 0.0).flatten(1).sum(-1)  # masked scores are -inf

    for l in range(L):
        torch.testing.assert_close(R("mid", l) - R("pre", l), R("A", l) - R("S", l), atol=1e-5, rtol=1e-4)
    out = attnlrp(model, ds, readout="input", per_prompt=True, progress=False)
    ratio = out.per_prompt.sum(-1) / out.meta["target"]
    print("tiny llama AttnLRP sum(R_input) / f per prompt:", [round(r, 3) for r in ratio.tolist()])


class _ActOverX(torch.autograd.Function):
    """Identity rule by its definition: backward multiplies by act(x) / x (x != 0 here)."""

    @staticmethod
    def forward(ctx, x):
        y = F.silu(x)
        ctx.save_for_backward(y / x)
        return y

    @staticmethod
    def backward(ctx, g):
        return g * ctx.saved_tensors[0]


class _Split(torch.autograd.Function):
    """Uniform rule by its definition: a factor's gradient divided by ``n``."""

    @staticmethod
    def forward(ctx, x, n):
        ctx.n = n
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g / ctx.n, None


@contextlib.contextmanager
def _hf_llama_rules(modeling):
    """Module-level AttnLRP on an unprocessed HF llama (restored on exit)."""
    saved = modeling.LlamaRMSNorm.forward, modeling.LlamaMLP.forward, modeling.eager_attention_forward

    def norm(self, h):
        return self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon).detach()

    def mlp(self, x):
        return self.down_proj(_Split.apply(_ActOverX.apply(self.gate_proj(x)) * self.up_proj(x), 2))

    def attention(module, q, k, v, *args, **kwargs):
        return saved[2](module, _Split.apply(q, 4), _Split.apply(k, 4), _Split.apply(v, 2), *args, **kwargs)

    modeling.LlamaRMSNorm.forward, modeling.LlamaMLP.forward, modeling.eager_attention_forward = norm, mlp, attention
    try:
        yield
    finally:
        modeling.LlamaRMSNorm.forward, modeling.LlamaMLP.forward, modeling.eager_attention_forward = saved


def test_attnlrp_matches_a_module_level_reference_on_hf_llama(tiny_llama, data):
    """The hook-point rules on the bridge (folded norms) equal AttnLRP written as module
    patches on the plain Hugging Face model with the same weights: input relevances agree."""
    from transformers.models.llama import modeling_llama

    from mechsteer.tiny import tiny_hf_model

    ds = data[id(tiny_llama)]
    hf = tiny_hf_model("llama").requires_grad_(False)
    with _hf_llama_rules(modeling_llama), torch.enable_grad():
        emb = hf.get_input_embeddings()(ds.tokens).requires_grad_(True)
        f = hf(inputs_embeds=emb).logits
        target = logit_diff(f, ds)
        (g,) = torch.autograd.grad(target.sum(), emb)
    got = attnlrp(tiny_llama, ds, readout="input", per_prompt=True, progress=False)
    torch.testing.assert_close(got.meta["target"], target.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.per_prompt, rel(emb, g), atol=1e-6, rtol=1e-4)


def test_heads_readout_key_positions(tiny_llama, data):
    ds = data[id(tiny_llama)]
    def run(**kw):
        return attnlrp(tiny_llama, ds, readout="heads", per_prompt=True, progress=False, **kw).per_prompt

    every = run()
    torch.testing.assert_close(run(key_pos=list(range(ds.n_pos))), every)
    shared = run(key_pos=[1, -3])
    torch.testing.assert_close(run(key_pos=[[1, -3]] * len(ds)), shared)
    pos = run(key_pos=[1, -3], positive=True)
    assert (pos >= 0).all() and (pos >= shared - 1e-7).all()


# ---- (7) no live hooks after a run, also after exceptions --------------------------------
def test_no_live_hooks_after_errors(tiny_gpt2):
    with pytest.raises(RuntimeError, match="boom"), lrp_rules(tiny_gpt2):
        raise RuntimeError("boom")
    assert live_hooks(tiny_gpt2) == []
    too_long = torch.randint(3, 100, (1, tiny_gpt2.cfg.n_ctx + 2))  # fails inside the forward
    with pytest.raises(IndexError):
        attnlrp(tiny_gpt2, too_long, answer=5, progress=False)
    assert live_hooks(tiny_gpt2) == []
    assert not any(p.requires_grad for p in tiny_gpt2.parameters())


def test_bad_input_is_a_clear_value_error(tiny_llama, data):
    ds = data[id(tiny_llama)]
    tokens = ds.tokens
    cases = [
        (dict(variant="lrp"), "variant"),
        (dict(uniform="scores"), "uniform"),
        (dict(readout="logits"), "readout"),
        (dict(sites=["z"]), "does not support site"),
        (dict(query_pos=ds.n_pos), "query_pos"),
        (dict(key_pos=[ds.n_pos]), "key_pos"),
        (dict(key_pos=[[0]] * (len(ds) + 1)), "one per prompt"),
        (dict(metric="prob"), "metric must be one of"),
        (dict(metric="logit", target="logit_diff"), "metric= only"),
        (dict(answer=ds.correct), "brings its own answers"),
        (dict(batch_size=0), "batch_size"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            attnlrp(tiny_llama, ds, progress=False, **kwargs)
    with pytest.raises(ValueError, match="needs answer="):
        attnlrp(tiny_llama, tokens, progress=False)
    with pytest.raises(ValueError, match="and wrong="):
        attnlrp(tiny_llama, tokens, metric="logit_diff", answer=ds.correct, progress=False)
    with pytest.raises(ValueError, match="token ids"):
        attnlrp(tiny_llama, tokens, answer=10**6, progress=False)
    assert live_hooks(tiny_llama) == []


def test_tokens_and_batches(tiny_llama, data):
    ds = data[id(tiny_llama)]
    whole = attnlrp(tiny_llama, ds, per_prompt=True, progress=False)
    batched = attnlrp(tiny_llama, ds, per_prompt=True, batch_size=4, progress=False)
    raw = attnlrp(tiny_llama, ds.tokens, metric="logit_diff", answer=ds.correct, wrong=ds.wrong,
                  readout="sites", per_prompt=True, progress=False)
    for k in whole:
        torch.testing.assert_close(batched[k].per_prompt, whole[k].per_prompt, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(raw.per_prompt, whole["sites"].per_prompt, atol=1e-6, rtol=1e-5)
    logit = attnlrp(tiny_llama, ds.tokens, answer=ds.correct, readout="input", progress=False)
    assert logit.metric == "logit" and logit.per_prompt is None and logit.axes == ("pos",)
    assert whole["sites"].labels["site"] == list(SITES) and whole["sites"].method == "attnlrp"
    with pytest.warns(DeprecationWarning, match="metric="):  # target= is the old name of metric=
        old = attnlrp(tiny_llama, ds.tokens, target="logit", answer=ds.correct, readout="input", progress=False)
    assert old.metric == "logit"
    torch.testing.assert_close(old.scores, logit.scores)


# ---- smollm2 ---------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_conservation(smollm2):
    ds = ioi(smollm2, n=4)
    cp = attnlrp(smollm2, ds, variant="cp", readout="input", per_prompt=True, progress=False)
    torch.testing.assert_close(cp.per_prompt.sum(-1), cp.meta["target"], rtol=1e-4, atol=1e-4)  # no biases
    lrp = attnlrp(smollm2, ds, per_prompt=True, progress=False)
    f = lrp["input"].meta["target"]
    ratio = (lrp["input"].per_prompt.sum() / f.sum()).item()
    print(f"smollm2 IOI AttnLRP sum(R_input) / logit diff = {ratio:.3f}")
    assert 0.1 < ratio < 1.5  # approximately conservative: the softmax leaks (measured about 0.4)
    last = lrp["sites"].per_prompt[:, -1, -1].sum(-1)  # resid_post of the last layer
    torch.testing.assert_close(last, f, rtol=1e-4, atol=1e-4)


def test_batch_size_none_fits_max_memory_and_keeps_the_numbers(tiny_llama):
    from mechsteer import runs

    ds = ioi(tiny_llama, n=6)
    one = attnlrp(tiny_llama, ds, readout="sites", batch_size=6, progress=False)
    row = runs.row_bytes(tiny_llama, ds.n_pos, 1)
    chunked = attnlrp(tiny_llama, ds, readout="sites", max_memory=4 * row, progress=False)  # 2 prompts per pass
    torch.testing.assert_close(chunked.scores, one.scores, rtol=1e-5, atol=1e-6)
    default = attnlrp(tiny_llama, ds, readout="sites", progress=False)  # batch_size=None: the memory budget
    torch.testing.assert_close(default.scores, one.scores, rtol=1e-5, atol=1e-6)
