"""Devices: every tensor a method creates lives on the model's device, and models split by
a ``device_map`` (accelerate's hooks around each module) give the same numbers.

Only the CPU is available where these tests were written, so:

- ``with torch.device("meta")`` makes every tensor created *without* ``device=`` a meta
  tensor (no data): a method that creates one where it meets the model's CPU tensors
  fails, exactly where it would copy between CPU and GPU on a GPU machine;
- accelerate's ``AlignDevicesHook`` (what ``device_map`` dispatch puts on each module) is
  placed on every block and the unembedding of a tiny model, all on the CPU: the methods
  run through accelerate's forward wrappers;
- a ``device_map`` offloading to CPU or disk next to other devices is refused with the
  fix (TransformerLens 4 cannot process offloaded weights in compatibility mode).

Untested here: a model really split over two devices (``n_devices=2``: needs 2 GPUs), and
CUDA itself (``benchmarks/gpu_check.py`` checks every method there).
"""

from __future__ import annotations

import pytest
import torch

import mechsteer
from mechsteer import runs
from mechsteer.attribution import (
    activation_patching,
    attnlrp,
    attribution_patching_all,
    direct_logit_attribution_all,
    run_suite,
)
from mechsteer.attribution.atp_ig import atp_ig_all
from mechsteer.attribution.atp_star import atp_star_all
from mechsteer.tasks import ioi
from mechsteer.tiny import tiny_hf_model, tiny_model, tiny_tokenizer

METHODS = {  # every attribution method, with the options that take other code paths
    "patching_heads": lambda m, ds: activation_patching(m, ds, site="z", per_position=True, progress=False),
    "patching_sites": lambda m, ds: activation_patching(m, ds, site=["attn_out", "mlp_out"], progress=False,
                                                        max_memory="1MB"),
    "atp": lambda m, ds: attribution_patching_all(m, ds, sites=("z", "attn_out", "resid_pre")),
    "atp*": lambda m, ds: atp_star_all(m, ds, sites=("z", "q", "k", "mlp_out")),
    "atp-ig": lambda m, ds: atp_ig_all(m, ds, sites=("z", "attn_out"), steps=2),
    "dla": lambda m, ds: direct_logit_attribution_all(m, ds),
    "attnlrp": lambda m, ds: attnlrp(m, ds, progress=False, key_pos=[1, 2], batch_size=2),
}


def _scores(out) -> dict[str, torch.Tensor]:
    out = out if isinstance(out, dict) else {"": out}
    return {k: v.scores for k, v in out.items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_methods_create_every_tensor_on_the_model_device(tiny, method):
    ds = ioi(tiny, n=4)
    expected = _scores(METHODS[method](tiny, ds))
    with torch.device("meta"):  # a factory call without device= now makes a data-less tensor
        got = _scores(METHODS[method](tiny, ds))
    assert got.keys() == expected.keys()
    for k in got:
        assert got[k].device.type == "cpu" and bool(got[k].isfinite().all())
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)


def test_run_suite_creates_every_tensor_on_the_model_device(tiny_llama):
    ds = ioi(tiny_llama, n=4)
    with torch.device("meta"):
        suite = run_suite(tiny_llama, ds, progress=False, max_memory="4MB")
    assert all(bool(r.scores.isfinite().all()) for grid in suite.results.values() for r in grid.values())


@pytest.fixture
def dispatched_llama():
    """A tiny llama whose blocks and unembedding run under accelerate's AlignDevicesHook
    (execution device CPU), as ``device_map`` dispatch leaves them."""
    hooks = pytest.importorskip("accelerate.hooks")
    model = tiny_model("llama")
    modules = [b.original_component for b in model.blocks] + [model.unembed.original_component]
    for m in modules:
        hooks.add_hook_to_module(m, hooks.AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=True))
    yield model
    for m in modules:
        hooks.remove_hook_from_module(m)


@pytest.mark.parametrize("method", ["patching_heads", "atp", "dla", "attnlrp"])
def test_methods_run_through_accelerate_dispatch_hooks(dispatched_llama, tiny_llama, method):
    ds = ioi(tiny_llama, n=4)
    expected, got = _scores(METHODS[method](tiny_llama, ds)), _scores(METHODS[method](dispatched_llama, ds))
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)


def test_float32_logits_leaves_an_accelerate_hooked_unembedding_alone(dispatched_llama):
    model = dispatched_llama.to(torch.bfloat16)
    tokens = model.to_tokens("Hello there")
    with torch.no_grad(), runs.float32_logits(model):
        assert model(tokens).dtype == torch.bfloat16  # accelerate owns forward: left as it is


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_device_map_on_one_device_gives_the_plain_numbers(saved_tiny):
    dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
          "model.rotary_emb": "cpu", "lm_head": "cpu"}
    plain, mapped = mechsteer.load_model(str(saved_tiny)), mechsteer.load_model(str(saved_tiny), device_map=dm)
    ds = ioi(plain, n=2)
    torch.testing.assert_close(METHODS["atp"](mapped, ds)["z"].scores, METHODS["atp"](plain, ds)["z"].scores)


@pytest.mark.parametrize("where", [{"model.layers.1": "disk"}, {"model.layers.1": "cuda:0"}])
def test_offloading_device_map_is_refused_with_the_fix(saved_tiny, where):
    dm = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
          "lm_head": "cpu", **where}
    with pytest.raises(ValueError, match="n_devices"):
        mechsteer.load_model(str(saved_tiny), device_map=dm)


def test_tiny_models_take_dtype_and_refuse_device_maps():
    assert next(mechsteer.load_model("tiny-llama", dtype=torch.bfloat16).parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="device="):
        mechsteer.load_model("tiny-gpt2", n_devices=2)


def test_gather_moves_per_layer_tensors_to_the_first_device():
    out = runs.gather([torch.ones(2), torch.zeros(2)], 1)
    assert out.shape == (2, 2) and out.device.type == "cpu"
