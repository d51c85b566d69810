"""Saving and loading learned interventions: safetensors + JSON, never pickle.

A saved intervention is a DIRECTORY with two files:

- ``params.safetensors``: the parameters theta, one tensor per site (keys = site names:
  ``attn_out``, ``mlp_out``, ``resid_post``, ``z``), exactly as held in ``iv.params``.
- ``meta.json``: what rebuilds the intervention and says what it is for: format and
  version, ``kind`` (the class name), sites, layers, positions, n_pos, slots (named or
  end-relative positions, or null), the model shapes
  (n_layers, d_model, n_heads, d_head), init_std, seed, each parameter's shape and dtype,
  the training hyperparameters (``config``: a ``TrainConfig`` or any dataclass / dict),
  the model's ``fingerprint`` (architecture, sizes, SHA-256 of its weights) and dtype when
  a model is given, the mechsteer and torch versions, and free-form ``extra``.

The directory is written through ``mechsteer._io.atomic_dir``: ``path`` is a symlink to a
hidden complete copy beside it (``.NAME.<hex>.dir``), swapped in one step, so ``path``
always shows a whole save, the old one or the new one, even after a crash or Ctrl-C. To
delete a save, delete both the link and ``os.path.realpath(path)`` (or the parent folder).

Loading reads JSON and safetensors only (``safetensors.torch.load_file``; no
``torch.load``, no unpickling), so a saved intervention from elsewhere cannot run code.
The class is looked up in the registry of kinds (``mechsteer.interventions.kinds``; the
file stores the class name, e.g. ``ActivScalar``); the fields of ``meta.json`` are type-checked, and
each tensor's dtype, shape and finiteness are checked against the JSON (and its shape
against the rebuilt class): a float64, integer, NaN or misshapen tensor is refused with a
ValueError naming the file and the tensor, never loaded silently. Given a model, loading
refuses one whose fingerprint differs from the saved one (parameters tied to one model's
activations mean nothing on another).
Hashing the weights takes about 2-4 s for SmolLM2-135M on CPU.

>>> import tempfile, torch
>>> from mechsteer.interventions.io import load_intervention, save_intervention
>>> from mechsteer.interventions.vectors import SteerVec
>>> from mechsteer.tiny import tiny_model
>>> model = tiny_model("gpt2")
>>> iv = SteerVec.for_model(model, sites=["mlp_out", "z"], n_pos=5)
>>> path = save_intervention(iv, tempfile.mkdtemp() + "/iv", model)
>>> sorted(p.name for p in path.iterdir())
['meta.json', 'params.safetensors']
>>> back = load_intervention(path, model)
>>> type(back).__name__, all(torch.equal(back.params[s], iv.params[s]) for s in iv.sites)
('SteerVec', True)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

import mechsteer
from mechsteer import _io
from mechsteer._validate import finite_float, positive_int
from mechsteer.interventions.base import Intervention
from mechsteer.interventions.kinds import KINDS, kind_name, kind_of_class
from mechsteer.models import check_fingerprint, fingerprint

FORMAT = "mechsteer.intervention"
FORMAT_VERSION = 1
PARAMS_FILE = "params.safetensors"
META_FILE = "meta.json"


def _config_dict(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return dict(config)
    raise TypeError(f"config must be a TrainConfig (or any dataclass), a dict or None; got {type(config).__name__}.")


def model_record(model) -> dict[str, Any]:
    """What a save stores about ``model``: ``{"model": fingerprint, "model_dtype": ...}``.

    Compute it while the model is at hand (a run does) and pass it to ``save_intervention``
    as ``model_record=`` to save later without the model.
    """
    return {"model": fingerprint(model), "model_dtype": str(model.cfg.dtype).removeprefix("torch.")}


def intervention_metadata(
    intervention: Intervention,
    model=None,
    *,
    config: Any = None,
    extra: dict[str, Any] | None = None,
    model_record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``meta.json`` dict of ``intervention`` (with ``model``'s fingerprint if given, or
    ``model_record``'s, from ``io.model_record(model)``)."""
    iv = intervention
    kind = type(iv).__name__
    if kind_name(type(iv)) is None:
        known = sorted(c.__name__ for c in KINDS.values())
        raise ValueError(f"Cannot save a {kind}: only {known} can be loaded back (see interventions.kinds.KINDS).")
    if model is not None:
        iv.check_model(model)
    record = _model_record(model, model_record)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "sites": list(iv.sites),
        "layers": list(iv.layers),
        "positions": iv.positions if isinstance(iv.positions, str) else list(iv.positions),
        "n_pos": iv.n_pos,
        "slots": list(iv.slots) if iv.slots is not None else None,  # named / end-relative positions
        "shapes": {"n_layers": iv.n_layers, "d_model": iv.d_model, "n_heads": iv.n_heads, "d_head": iv.d_head,
                   "n_kv_heads": iv.n_kv_heads},  # GQA: the v site's parameters are per KV head
        "init_std": iv.init_std,
        "seed": iv.seed,
        "params": {
            s: {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."), "requires_grad": p.requires_grad}
            for s, p in iv.params.items()
        },
        "train_config": _config_dict(config),
        "model": record["model"],
        "model_dtype": record["model_dtype"],
        "mechsteer_version": mechsteer.__version__,
        "torch_version": torch.__version__,
        "extra": extra,
    }


def _model_record(model, given: dict[str, Any] | None) -> dict[str, Any]:
    if model is not None:
        return model_record(model)
    if given is None:
        return {"model": None, "model_dtype": None}
    if not isinstance(given, dict) or set(given) != {"model", "model_dtype"}:
        raise ValueError(f"model_record must be the dict io.model_record(model) returns, got {given!r}.")
    return given


def save_intervention(
    intervention: Intervention,
    path: str | os.PathLike,
    model=None,
    *,
    config: Any = None,
    extra: dict[str, Any] | None = None,
    model_record: dict[str, Any] | None = None,
) -> Path:
    """Write ``intervention`` to the directory ``path`` (``params.safetensors`` + ``meta.json``).

    With ``model``, its fingerprint is stored and checked on loading. ``config`` (e.g. the
    ``TrainConfig`` used) and ``extra`` (any JSON-serialisable dict) go into ``meta.json``.
    Without ``model``, ``model_record`` (``io.model_record(model)``, taken earlier) gives
    the fingerprint to store.
    An existing save at ``path`` is replaced atomically; any other existing file or
    non-empty directory there is refused.
    """
    path = Path(path)
    if path.exists() and not _is_save(path) and not (path.is_dir() and not any(path.iterdir())):
        raise ValueError(f"{path} exists and is not a saved intervention; choose a new path (it would be replaced).")
    meta = intervention_metadata(intervention, model, config=config, extra=extra, model_record=model_record)
    try:
        text = json.dumps(meta, indent=2, default=_io._json_default, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config / extra must be JSON-serialisable (finite numbers, str, lists, dicts): {e}") from e
    tensors = {s: p.detach().cpu().contiguous() for s, p in intervention.params.items()}
    with _io.atomic_dir(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp / PARAMS_FILE), metadata={"format": FORMAT, "kind": meta["kind"]})
        _io.write_text(tmp / META_FILE, text + "\n")
    return path


def _is_save(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file()


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` dict of the saved intervention at ``path`` (format and fields checked)."""
    return _read_metadata(Path(path), Path(path))


def _read_metadata(src: Path, shown: Path) -> dict[str, Any]:
    """Read ``src / meta.json``; errors name ``shown`` (the path the caller gave)."""
    if not src.exists():
        raise FileNotFoundError(f"No saved intervention at {shown}.")
    if not src.is_dir():
        raise ValueError(f"{shown} is a file; a saved intervention is a directory with {PARAMS_FILE} and {META_FILE}.")
    meta_path = shown / META_FILE
    if not (src / META_FILE).is_file():
        raise FileNotFoundError(f"{meta_path} is missing: {shown} is not a saved intervention (or is incomplete).")
    try:
        meta = json.loads((src / META_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}); the save is corrupt, write it again.") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not mechsteer intervention metadata (expected format {FORMAT!r}).")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path} has format_version {meta.get('format_version')!r}; this mechsteer "
            f"({mechsteer.__version__}) reads version {FORMAT_VERSION}."
        )
    missing = [k for k in ("kind", "sites", "layers", "positions", "n_pos", "shapes", "params") if k not in meta]
    if missing:
        raise ValueError(f"{meta_path} lacks the keys {missing}; the save is corrupt, write it again.")
    _check_fields(meta, meta_path)
    return meta


def _check_fields(meta: dict[str, Any], meta_path: Path) -> None:
    """TypeError/ValueError naming ``meta_path`` and the field unless each field has its type."""
    field = f"{meta_path}: field"
    for key in ("shapes", "params"):
        if not isinstance(meta[key], dict):
            raise ValueError(f"{field} {key!r} must be an object, got {meta[key]!r}; the save is corrupt.")
    if not isinstance(meta["sites"], list) or not all(isinstance(s, str) for s in meta["sites"]):
        raise ValueError(f"{field} 'sites' must be a list of site names, got {meta['sites']!r}.")
    for key in ("layers", "positions"):
        v, text_ok = meta[key], key == "positions"  # positions may also be "all" / "last"
        if not (text_ok and isinstance(v, str)) and not (isinstance(v, list) and all(_is_int(x) for x in v)):
            raise ValueError(f"{field} {key!r} must be a list of ints{' or a string' * text_ok}, got {v!r}.")
    shapes = meta["shapes"]
    for key in ("n_layers", "d_model"):
        positive_int(f"{field} 'shapes.{key}'", shapes.get(key))
    for key in ("n_heads", "d_head"):
        positive_int(f"{field} 'shapes.{key}'", shapes.get(key), allow_none=True)
    positive_int(f"{field} 'n_pos'", meta["n_pos"], allow_none=True)
    finite_float(f"{field} 'init_std'", meta.get("init_std", 0.0))
    if not _is_int(seed := meta.get("seed", 0)):
        raise TypeError(f"{field} 'seed' must be an integer, got {seed!r} ({type(seed).__name__}).")
    for site in meta["sites"]:
        info = meta["params"].get(site)
        if not isinstance(info, dict) or not {"shape", "dtype"} <= set(info):
            raise ValueError(f"{field} 'params.{site}' must give the tensor's 'shape' and 'dtype', got {info!r}.")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(_is_int(n) for n in shape):
            raise ValueError(f"{field} 'params.{site}.shape' must be a list of ints, got {shape!r}.")
        dtype = getattr(torch, str(info["dtype"]), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(
                f"{field} 'params.{site}.dtype' is {info['dtype']!r}; an intervention's parameters are "
                "floating point (float32, float16, bfloat16 or float64)."
            )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def load_intervention(path: str | os.PathLike, model=None, *, check: bool = True) -> Intervention:
    """Rebuild the intervention saved at ``path`` (exactly: same class, spec and parameters).

    Every tensor in ``params.safetensors`` must have the dtype and shape that ``meta.json``
    gives it (and the shape the class needs for that spec) and be finite, or a ValueError
    names the file, the tensor, what the metadata says and what was found.

    With ``model`` (and ``check=True``) a model whose fingerprint differs from the saved
    one is refused with a ValueError naming what differs (a save made without a model holds
    no fingerprint: then only the shapes are checked); the parameters are moved to the
    model's device. Never unpickles.
    """
    if not isinstance(check, bool):
        raise TypeError(f"check must be True or False, got {check!r} ({type(check).__name__}).")
    path = Path(path)
    src = Path(os.path.realpath(path))  # one version read whole, even if a new save swaps in meanwhile
    meta = _read_metadata(src, path)
    cls = kind_of_class(meta["kind"])
    if cls is None:
        known = sorted(c.__name__ for c in KINDS.values())
        raise ValueError(f"{path / META_FILE}: unknown kind {meta['kind']!r}; known kinds: {known}.")
    params_path = path / PARAMS_FILE
    if not (src / PARAMS_FILE).is_file():
        raise FileNotFoundError(f"{params_path} is missing: the save at {path} is incomplete, write it again.")
    try:
        tensors = safetensors.torch.load_file(str(src / PARAMS_FILE), device="cpu")
    except safetensors.SafetensorError as e:
        raise ValueError(f"{params_path} is not a valid safetensors file ({e}); the save is corrupt.") from e
    _check_tensors(tensors, meta, params_path)
    if model is not None and check and meta.get("model") is not None:
        try:
            check_fingerprint(model, meta["model"])
        except ValueError as e:
            raise ValueError(
                f"Refusing to load {path} onto this model. {e}\nLoad it onto the model it was trained on, "
                "or pass check=False if you are sure the difference does not matter."
            ) from None
    shapes = meta["shapes"]
    iv = cls(
        meta["sites"],
        meta["layers"],
        meta["positions"],
        n_layers=shapes["n_layers"],
        d_model=shapes["d_model"],
        n_heads=shapes.get("n_heads"),
        d_head=shapes.get("d_head"),
        n_kv_heads=shapes.get("n_kv_heads"),  # absent in saves before the v site: None = n_heads
        n_pos=meta["n_pos"],
        slots=meta.get("slots"),  # absent in saves before slots
        init_std=meta.get("init_std", 0.0),
        seed=meta.get("seed", 0),
    )
    _fill_params(iv, tensors, meta, params_path)
    if model is not None:
        iv.check_model(model)
        iv.to(next(model.parameters()).device)
    return iv


def _check_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any], params_path: Path) -> None:
    """ValueError unless the file holds one finite tensor per site with the dtype and shape of ``meta``."""
    sites = meta["sites"]
    if set(tensors) != set(sites):
        raise ValueError(f"{params_path} holds tensors {sorted(tensors)}; {META_FILE} names sites {list(sites)}.")
    for site in sites:
        t, info = tensors[site], meta["params"][site]
        said = f"{META_FILE} says {info['dtype']} {tuple(info['shape'])}"
        dtype = str(t.dtype).removeprefix("torch.")
        found = f"{dtype} {tuple(t.shape)}"
        if dtype != info["dtype"]:
            raise ValueError(f"{params_path}: tensor {site!r} is {found}, but {said}; the save is corrupt or was edited.")
        if list(t.shape) != info["shape"]:
            raise ValueError(
                f"{params_path}: tensor {site!r} has shape {tuple(t.shape)}, but {said}; "
                "the save is corrupt or was edited."
            )
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0].tolist())
            raise ValueError(
                f"{params_path}: tensor {site!r} ({found}) holds {int(bad.sum())} NaN or infinite values of "
                f"{t.numel()} (first at index {first}); {said} with finite values. The save is corrupt, or "
                "training diverged before it was saved."
            )


def _fill_params(iv: Intervention, tensors: dict[str, torch.Tensor], meta: dict[str, Any], params_path: Path) -> None:
    for site in iv.sites:
        t, want = tensors[site], iv.param_shape(site)
        if tuple(t.shape) != want:
            raise ValueError(
                f"{params_path}: {site!r} has shape {tuple(t.shape)} (as {META_FILE} says), but a {type(iv).__name__} "
                f"with this spec needs {want}; the save is corrupt or was edited."
            )
        grad = bool(meta["params"][site].get("requires_grad", True))
        iv.params[site] = torch.nn.Parameter(t, requires_grad=grad)
