import pytest
import torch

from mechsteer.sites import (
    SITES,
    HookNotFiredError,
    Location,
    has_site,
    hook_name,
    hooked,
    live_hooks,
    run_with_hooks,
    site_shape,
)


def test_every_site_has_the_documented_shape(tiny):
    tokens = tiny.to_tokens(["The capital of France is Paris."])
    n_pos = tokens.shape[1]
    tiny.set_use_attn_result(True)
    try:
        names = {
            hook_name(s, 1 if SITES[s].per_layer else None, tiny): s for s in SITES if has_site(tiny, s, 1)
        }
        assert {"resid_pre", "z", "result", "mlp_post", "ln1_scale", "embed", "final_scale", "logits"} <= set(names.values())
        _, cache = tiny.run_with_cache(tokens, names_filter=lambda n: n in names)
    finally:
        tiny.set_use_attn_result(False)
    for name, site in names.items():
        assert tuple(cache[name].shape[1:]) == site_shape(tiny, site, n_pos), site


def test_gqa_keys_and_values_are_per_kv_head(tiny_llama):
    assert site_shape(tiny_llama, "k", 5) == (5, 2, 16)
    assert site_shape(tiny_llama, "q", 5) == (5, 4, 16)
    with pytest.raises(ValueError, match="kv_head is 0..1"):
        Location("k", 0, head=3).validate(tiny_llama)
    Location("q", 0, head=3).validate(tiny_llama)


def test_bad_locations_are_clear_errors(tiny_gpt2):
    with pytest.raises(ValueError, match="Did you mean 'attn_out'"):
        hook_name("attn_outt", 0)
    with pytest.raises(ValueError, match=r"layers 0..1"):
        Location("attn_out", 2).validate(tiny_gpt2)
    with pytest.raises(ValueError, match="no head axis"):
        Location("mlp_out", 0, head=0).validate(tiny_gpt2)
    with pytest.raises(ValueError, match="beyond the prompt"):
        Location("z", 0, pos=7, head=0).validate(tiny_gpt2, n_pos=7)
    assert Location("z", 0, pos=-7, head=3).validate(tiny_gpt2, n_pos=7)
    with pytest.raises(ValueError, match="set_use_attn_result"):
        hook_name("result", 0, tiny_gpt2)


def test_hooked_counts_calls_and_removes_hooks(tiny):
    tokens = tiny.to_tokens(["Hello there"])
    name = hook_name("mlp_out", 0)
    with hooked(tiny, [(name, lambda x, hook: x)]) as calls:
        tiny(tokens)
        tiny(tokens)
    assert calls == {f"fwd:{name}": 2}
    assert live_hooks(tiny) == []


def test_hook_that_does_not_fire_is_reported(tiny):
    tokens = tiny.to_tokens(["Hello there"])
    with pytest.raises(HookNotFiredError, match="blocks.1.hook_attn_out"):
        with hooked(tiny, [(hook_name("attn_out", 0), lambda x, hook: x), (hook_name("attn_out", 1), lambda x, hook: x)]):
            tiny(tokens, stop_at_layer=1)
    assert live_hooks(tiny) == []


def test_hooks_never_leak_after_an_exception_in_a_hook(tiny):
    tokens = tiny.to_tokens(["Hello there"])

    def boom(x, hook):
        raise RuntimeError("inside hook")

    with pytest.raises(RuntimeError, match="inside hook"):
        run_with_hooks(tiny, tokens, [(hook_name("resid_post", 0), boom)])
    assert live_hooks(tiny) == []
    with pytest.raises(KeyError):
        with hooked(tiny, [(hook_name("resid_post", 0), lambda x, hook: x)]):
            raise KeyError("in the body")
    assert live_hooks(tiny) == []


def test_backward_hooks_fire_and_are_scoped(tiny):
    tokens = tiny.to_tokens(["Hello there"])
    grads = {}
    name = hook_name("resid_mid", 1)

    def save(g, hook):
        grads[name] = g.detach().clone()

    # parameters are frozen, so the embedding output is made a leaf that needs a gradient
    with hooked(tiny, [("hook_embed", lambda a, hook: a.detach().requires_grad_(True))], [(name, save)]):
        tiny(tokens)[0, -1].sum().backward()
    assert grads[name].shape[-1] == tiny.cfg.d_model
    assert live_hooks(tiny) == []


def test_callbacks_see_canonical_names_so_we_key_on_the_registered_one(tiny_gpt2):
    seen = []
    registered = hook_name("resid_post", 0)
    with hooked(tiny_gpt2, [(registered, lambda x, hook: seen.append(hook.name))]) as calls:
        tiny_gpt2(tiny_gpt2.to_tokens(["Hi"]))
    assert calls == {f"fwd:{registered}": 1}
    assert seen and isinstance(seen[0], str)


def test_hooked_rejects_unknown_and_gated_names(tiny_gpt2):
    with pytest.raises(ValueError, match="Unknown hook"):
        with hooked(tiny_gpt2, [("blocks.0.hook_attn_outt", lambda x, hook: x)]):
            pass
    with pytest.raises(ValueError, match="set_use_attn_result"):
        with hooked(tiny_gpt2, [("blocks.0.attn.hook_result", lambda x, hook: x)]):
            pass
    assert live_hooks(tiny_gpt2) == []


def test_patching_a_site_changes_the_output(tiny):
    tokens = tiny.to_tokens(["The capital of France is"])
    with torch.no_grad():
        clean = tiny(tokens)
        zeroed = run_with_hooks(tiny, tokens, [(hook_name("attn_out", 0), lambda x, hook: torch.zeros_like(x))])
        again = tiny(tokens)
    assert not torch.allclose(clean, zeroed)
    torch.testing.assert_close(clean, again)


def test_site_facts_are_data():
    from mechsteer.sites import check_sites, sites_for

    assert sites_for("patch") == ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z")
    assert sites_for("dla") == ("attn_out", "mlp_out", "z")
    with pytest.raises(ValueError, match="ln2.hook_in"):  # the site's own note explains why not
        check_sites("resid_mid", "intervene", name="sites")
    with pytest.raises(ValueError, match="takes a layer"):
        hook_name("z")
    with pytest.raises(ValueError, match="takes no layer"):
        hook_name("embed", 0)
