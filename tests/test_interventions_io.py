"""Saving / loading interventions: safetensors + JSON, exact round trip, fingerprint checks."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import safetensors.torch
import torch

from mechsteer.interventions.io import KINDS, load_intervention, read_metadata, save_intervention
from mechsteer.interventions.scalars import ActivScalar, DynScalar
from mechsteer.interventions.train import TrainConfig
from mechsteer.interventions.vectors import SteerVec
from mechsteer.models import fingerprint
from mechsteer.sites import live_hooks
from mechsteer.tiny import tiny_model

CLASSES = [ActivScalar, SteerVec, DynScalar]
SITES = ["attn_out", "mlp_out", "resid_post", "z"]
PROMPT = "The capital of France is"


def _build(cls, model, sites, std=0.5, **kw):
    n_pos = model.to_tokens(PROMPT).shape[1]
    iv = cls.for_model(model, sites=sites, n_pos=n_pos, **kw)
    with torch.no_grad():
        for p in iv.parameters():
            p.normal_(0, std)
    return iv


def _steered(model, iv, beta=1.0):
    return iv(model, model.to_tokens(PROMPT), beta)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_gpt2):
    iv = _build(ActivScalar, tiny_gpt2, ["attn_out", "z"])
    return iv, save_intervention(iv, tmp_path_factory.mktemp("iv") / "iv", tiny_gpt2, config=TrainConfig(epochs=3))


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("sites", [[s] for s in SITES] + [SITES])
@pytest.mark.parametrize("with_model", [True, False])
def test_round_trip_exact(tmp_path, tiny, cls, sites, with_model):
    iv = _build(cls, tiny, sites, layers=[1] if len(sites) == 1 else None)
    path = save_intervention(iv, tmp_path / "iv", tiny if with_model else None)
    back = load_intervention(path, tiny if with_model else None)
    assert type(back) is cls
    assert (back.sites, back.layers, back.positions, back.n_pos) == (iv.sites, iv.layers, iv.positions, iv.n_pos)
    for s in sites:
        assert torch.equal(back.params[s], iv.params[s]) and back.params[s].dtype == iv.params[s].dtype
        assert back.params[s].requires_grad
    assert torch.equal(_steered(tiny, back), _steered(tiny, iv))
    assert live_hooks(tiny) == []


@pytest.mark.parametrize("positions", ["last", [1, -2]])
def test_round_trip_positions(tmp_path, tiny_llama, positions):
    for cls in CLASSES:
        iv = _build(cls, tiny_llama, ["z", "mlp_out"], positions=positions)
        back = load_intervention(save_intervention(iv, tmp_path / cls.__name__), tiny_llama)
        assert back.positions == iv.positions
        assert torch.equal(_steered(tiny_llama, back), _steered(tiny_llama, iv))


def test_metadata_contents(saved, tiny_gpt2):
    iv, path = saved
    meta = read_metadata(path)
    assert meta["kind"] == "ActivScalar" and meta["sites"] == ["attn_out", "z"]
    assert meta["layers"] == [0, 1] and meta["positions"] == "all" and meta["n_pos"] == iv.n_pos
    assert meta["shapes"] == {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_head": 16}
    assert meta["params"]["z"]["shape"] == list(iv.params["z"].shape)
    assert meta["train_config"]["epochs"] == 3 and meta["train_config"]["lr"] is None
    assert meta["model"] == fingerprint(tiny_gpt2) and meta["model_dtype"] == "float32"
    assert meta["init_std"] == iv.init_std and meta["seed"] == iv.seed and "mechsteer_version" in meta


def test_extra_and_bad_extra(tmp_path, tiny_gpt2):
    iv = _build(DynScalar, tiny_gpt2, ["mlp_out"])
    path = save_intervention(iv, tmp_path / "a", extra={"task": "ccc", "acc": torch.tensor(0.5)})
    assert read_metadata(path)["extra"] == {"task": "ccc", "acc": 0.5}
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_intervention(iv, tmp_path / "b", extra={"x": object()})
    with pytest.raises(TypeError, match="config must be"):
        save_intervention(iv, tmp_path / "c", config=3)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_other_model_is_refused(saved, tiny_llama):
    _, path = saved
    with pytest.raises(ValueError, match=r"(?s)fingerprints differ.*name: saved 'tiny-gpt2', model 'tiny-llama'"):
        load_intervention(path, tiny_llama)


def test_changed_weight_is_refused(saved):
    iv, path = saved
    same = tiny_model("gpt2")  # built again: same weights, same fingerprint
    assert torch.equal(_steered(same, load_intervention(path, same)), _steered(same, iv))
    with torch.no_grad():
        next(iter(same.original_model.parameters())).view(-1)[0] += 1e-3
    with pytest.raises(ValueError, match=r"(?s)Refusing to load.*weights_sha256: saved .*check=False"):
        load_intervention(path, same)
    assert torch.equal(load_intervention(path, same, check=False).params["z"], iv.params["z"])


def test_shapes_of_another_model_refused_at_save(tmp_path, tiny_gpt2):
    iv = ActivScalar(["attn_out"], n_layers=3, d_model=64, n_pos=5)
    with pytest.raises(ValueError, match="n_layers"):
        save_intervention(iv, tmp_path / "iv", tiny_gpt2)


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_meta(path, **changes):
    meta = json.loads((path / "meta.json").read_text())
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


def test_bad_files(saved, tmp_path):
    _, path = saved
    p = _copy(path, tmp_path / "kind")
    _edit_meta(p, kind="Pickled")
    with pytest.raises(ValueError, match=r"unknown kind 'Pickled'; known kinds: \['ActivScalar'"):
        load_intervention(p)
    p = _copy(path, tmp_path / "nopar")
    (p / "params.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="params.safetensors is missing"):
        load_intervention(p)
    p = _copy(path, tmp_path / "nometa")
    (p / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        load_intervention(p)
    p = _copy(path, tmp_path / "badjson")
    (p / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_intervention(p)
    p = _copy(path, tmp_path / "badst")
    (p / "params.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_intervention(p)
    with pytest.raises(FileNotFoundError, match="No saved intervention"):
        load_intervention(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is a file"):
        load_intervention(p / "meta.json")


def test_shape_mismatch(saved, tmp_path):
    iv, path = saved
    p = _copy(path, tmp_path / "npos")
    _edit_meta(p, n_pos=iv.n_pos + 1)  # the spec no longer matches the tensors
    with pytest.raises(ValueError, match=r"'attn_out' has shape \(2, \d+\).*needs \(2, \d+\)"):
        load_intervention(p)
    p = _copy(path, tmp_path / "tensor")
    tensors = {"attn_out": torch.zeros(2, 3), "z": iv.params["z"].detach()}
    safetensors.torch.save_file(tensors, str(p / "params.safetensors"))
    with pytest.raises(ValueError, match="'attn_out' has shape"):
        load_intervention(p)
    p = _copy(path, tmp_path / "sites")
    safetensors.torch.save_file({"z": iv.params["z"].detach()}, str(p / "params.safetensors"))
    with pytest.raises(ValueError, match="holds tensors"):
        load_intervention(p)


def test_no_pickle(saved, tiny_gpt2, monkeypatch):
    iv, path = saved
    assert sorted(f.name for f in path.iterdir()) == ["meta.json", "params.safetensors"]

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling was attempted")

    for mod, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(mod, name, refuse)
    back = load_intervention(path, tiny_gpt2)
    assert torch.equal(back.params["attn_out"], iv.params["attn_out"])


def test_atomic_write(tmp_path, tiny_gpt2, monkeypatch):
    iv = _build(SteerVec, tiny_gpt2, ["mlp_out"])
    old = save_intervention(iv, tmp_path / "iv")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    other = _build(SteerVec, tiny_gpt2, ["attn_out"])
    with pytest.raises(OSError, match="disk full"):
        save_intervention(other, tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        save_intervention(other, old)
    # no partial or temporary directory: only the save (a link) and the hidden copy it points to
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(["iv", os.readlink(old)])
    assert load_intervention(old).sites == ("mlp_out",)


def test_refuses_to_clobber_and_unknown_kinds(tmp_path, tiny_gpt2):
    iv = _build(DynScalar, tiny_gpt2, ["mlp_out"])
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a saved intervention"):
        save_intervention(iv, tmp_path / "project")
    assert (tmp_path / "project" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    assert load_intervention(save_intervention(iv, tmp_path / "empty")).sites == ("mlp_out",)

    class MyScalar(ActivScalar):
        pass

    with pytest.raises(ValueError, match="Cannot save a MyScalar"):
        save_intervention(MyScalar(["mlp_out"], n_layers=2, d_model=64, n_pos=3), tmp_path / "mine")
    assert set(KINDS) == {"ActivScalar", "SteerVec", "DynScalar"}
