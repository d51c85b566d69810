"""Saving / loading interventions: safetensors + JSON, exact round trip, fingerprint checks."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import safetensors.torch
import torch

from mechsteer.interventions import load_intervention, save_intervention
from mechsteer.interventions.io import read_metadata
from mechsteer.interventions.kinds import KINDS
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
    assert meta["shapes"] == {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_head": 16, "n_kv_heads": 4}
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


def _tamper(path, dst, site, tensor):
    """A copy of the save at ``path`` whose tensor ``site`` is replaced by ``tensor`` (meta.json unchanged)."""
    p = _copy(path, dst)
    tensors = safetensors.torch.load_file(str(p / "params.safetensors"))
    tensors[site] = tensor
    safetensors.torch.save_file(tensors, str(p / "params.safetensors"))
    return p


def _z(iv):
    return iv.params["z"].detach().clone()


@pytest.mark.parametrize(
    "change, found",
    [
        (lambda z: z.double(), r"is float64 \(2, \d+, 4\), but meta.json says float32 \(2, \d+, 4\)"),
        (lambda z: z.half(), r"is float16 .*, but meta.json says float32"),
        (lambda z: z.round().long(), r"is int64 .*, but meta.json says float32"),
        (lambda z: z.flatten(), r"has shape \(\d+,\), but meta.json says float32 \(2, \d+, 4\)"),
        (lambda z: z.index_put_((torch.tensor(0),), torch.tensor(float("nan"))), r"holds \d+ NaN or infinite values"),
        (lambda z: z.view(-1).index_put_((torch.tensor(3),), torch.tensor(float("inf"))).view(z.shape),
         r"holds 1 NaN or infinite values of \d+ \(first at index \(0, 0, 3\)\)"),
    ],
    ids=["float64", "float16", "int64", "shape", "nan", "inf"],
)
def test_tampered_tensor_is_refused(saved, tmp_path, change, found):
    iv, path = saved
    p = _tamper(path, tmp_path / "t", "z", change(_z(iv)))
    with pytest.raises(ValueError, match=rf"params.safetensors: tensor 'z' .*{found}"):
        load_intervention(p)
    assert str(tmp_path / "t") in _message(p)  # names the path given, not the hidden copy


def _message(p):
    with pytest.raises(ValueError) as err:
        load_intervention(p)
    return str(err.value)


def test_tampered_metadata_is_refused(saved, tmp_path):
    iv, path = saved
    p = _tamper(path, tmp_path / "int", "z", _z(iv).round().long())
    meta = json.loads((p / "meta.json").read_text())
    meta["params"]["z"]["dtype"] = "int64"  # both edited: still not a parameter dtype
    (p / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"field 'params.z.dtype' is 'int64'; an intervention's parameters are float"):
        load_intervention(p)
    p = _tamper(path, tmp_path / "f64", "z", _z(iv).double())
    meta["params"]["z"]["dtype"] = "float64"  # both say float64: consistent, loads as float64
    (p / "meta.json").write_text(json.dumps(meta))
    assert load_intervention(p).params["z"].dtype == torch.float64
    bad_fields = [
        ({"shapes": {"n_layers": "two", "d_model": 64}}, TypeError, r"'shapes.n_layers' must be a positive integer"),
        ({"shapes": {"n_layers": 2, "d_model": 0}}, ValueError, r"'shapes.d_model' must be a positive integer, got 0"),
        ({"n_pos": True}, TypeError, r"'n_pos' must be a positive integer, got True"),
        ({"layers": [0, 1.5]}, ValueError, r"'layers' must be a list of ints, got \[0, 1.5\]"),
        ({"positions": {"last": 1}}, ValueError, r"'positions' must be a list of ints or a string"),
        ({"init_std": float("nan")}, ValueError, r"'init_std' must be a finite number, got nan"),
        ({"seed": 0.5}, TypeError, r"'seed' must be an integer, got 0.5"),
        ({"params": {"attn_out": {"shape": [2, 5]}}}, ValueError, r"'params.attn_out' must give the tensor's 'shape' and"),
        ({"sites": "z"}, ValueError, r"'sites' must be a list of site names, got 'z'"),
    ]
    for i, (changes, err, msg) in enumerate(bad_fields):
        p = _copy(path, tmp_path / f"field{i}")
        _edit_meta(p, **changes)
        with pytest.raises(err, match=rf"meta.json: field {msg}"):
            load_intervention(p)
        with pytest.raises(err, match=msg):
            read_metadata(p)
    with pytest.raises(TypeError, match="check"):  # (the tests also type-check annotations at run time)
        load_intervention(path, check=1)


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
    monkeypatch.undo()
    legacy = _copy(old, tmp_path / "legacy")  # a real directory, as saved before links
    assert load_intervention(save_intervention(other, legacy)).sites == ("attn_out",) and legacy.is_symlink()


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
    assert {c.__name__ for c in KINDS.values()} == {"ActivScalar", "SteerVec", "DynScalar"}


@pytest.mark.parametrize("kind", ["ActivScalar", "SteerVec"])
def test_v_site_round_trip_on_gqa(tiny_llama, tmp_path, kind):
    """The v site's parameters are per KV head (GQA): the save records n_kv_heads."""
    import mechsteer.interventions as I

    assert tiny_llama.cfg.n_key_value_heads not in (None, tiny_llama.cfg.n_heads)  # the tiny llama is GQA
    iv = getattr(I, kind).for_model(tiny_llama, sites=["v"], n_pos=5)
    for p in iv.params.values():
        p.data.normal_()
    path = I.save_intervention(iv, tmp_path / "v", model=tiny_llama)
    back = I.load_intervention(path, tiny_llama)
    assert back.n_kv_heads == iv.n_kv_heads and all(torch.equal(back.params[s], iv.params[s]) for s in iv.sites)
