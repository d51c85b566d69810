"""Saving and loading learned interventions: safetensors + JSON, never pickle.

A saved intervention is a DIRECTORY with two files:

- ``params.safetensors``: the parameters theta, one tensor per site (keys = site names:
  ``attn_out``, ``mlp_out``, ``resid_post``, ``z``), exactly as held in ``iv.params``.
- ``meta.json``: what rebuilds the intervention and says what it is for: format and
  version, ``kind`` (the class name), sites, layers, positions, n_pos, the model shapes
  (n_layers, d_model, n_heads, d_head), init_std, seed, each parameter's shape and dtype,
  the training hyperparameters (``config``: a ``TrainConfig`` or any dataclass / dict),
  the model's ``fingerprint`` (architecture, sizes, SHA-256 of its weights) and dtype when
  a model is given, the mechsteer and torch versions, and free-form ``extra``.

The directory is written through ``mechsteer._io.atomic_dir``: it appears complete or not
at all, and an earlier save at the same path is replaced only once the new one is whole.

Loading reads JSON and safetensors only (``safetensors.torch.load_file``; no
``torch.load``, no unpickling), so a saved intervention from elsewhere cannot run code.
The class is looked up in ``KINDS``; parameter shapes are checked against both the JSON
and the rebuilt class. Given a model, loading refuses one whose fingerprint differs from
the saved one (parameters tied to one model's activations mean nothing on another).
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
from mechsteer.interventions.base import Intervention
from mechsteer.interventions.scalars import ActivScalar, DynScalar
from mechsteer.interventions.vectors import SteerVec
from mechsteer.models import check_fingerprint, fingerprint

FORMAT = "mechsteer.intervention"
FORMAT_VERSION = 1
PARAMS_FILE = "params.safetensors"
META_FILE = "meta.json"
KINDS: dict[str, type[Intervention]] = {c.__name__: c for c in (ActivScalar, SteerVec, DynScalar)}


def _config_dict(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return dict(config)
    raise TypeError(f"config must be a TrainConfig (or any dataclass), a dict or None; got {type(config).__name__}.")


def intervention_metadata(
    intervention: Intervention, model=None, *, config: Any = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``meta.json`` dict of ``intervention`` (with ``model``'s fingerprint if given)."""
    iv = intervention
    kind = type(iv).__name__
    if KINDS.get(kind) is not type(iv):
        raise ValueError(f"Cannot save a {kind}: only {sorted(KINDS)} can be loaded back (see io.KINDS).")
    if model is not None:
        iv.check_model(model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "sites": list(iv.sites),
        "layers": list(iv.layers),
        "positions": iv.positions if isinstance(iv.positions, str) else list(iv.positions),
        "n_pos": iv.n_pos,
        "shapes": {"n_layers": iv.n_layers, "d_model": iv.d_model, "n_heads": iv.n_heads, "d_head": iv.d_head},
        "init_std": iv.init_std,
        "seed": iv.seed,
        "params": {
            s: {"shape": list(p.shape), "dtype": str(p.dtype).removeprefix("torch."), "requires_grad": p.requires_grad}
            for s, p in iv.params.items()
        },
        "train_config": _config_dict(config),
        "model": None if model is None else fingerprint(model),
        "model_dtype": None if model is None else str(model.cfg.dtype).removeprefix("torch."),
        "mechsteer_version": mechsteer.__version__,
        "torch_version": torch.__version__,
        "extra": extra,
    }


def save_intervention(
    intervention: Intervention,
    path: str | os.PathLike,
    model=None,
    *,
    config: Any = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``intervention`` to the directory ``path`` (``params.safetensors`` + ``meta.json``).

    With ``model``, its fingerprint is stored and checked on loading. ``config`` (e.g. the
    ``TrainConfig`` used) and ``extra`` (any JSON-serialisable dict) go into ``meta.json``.
    An existing save at ``path`` is replaced atomically; any other existing file or
    non-empty directory there is refused.
    """
    path = Path(path)
    if path.exists() and not _is_save(path) and not (path.is_dir() and not any(path.iterdir())):
        raise ValueError(f"{path} exists and is not a saved intervention; choose a new path (it would be replaced).")
    meta = intervention_metadata(intervention, model, config=config, extra=extra)
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
    """The ``meta.json`` dict of the saved intervention at ``path`` (format checked)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No saved intervention at {path}.")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; a saved intervention is a directory with {PARAMS_FILE} and {META_FILE}.")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: {path} is not a saved intervention (or is incomplete).")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
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
    return meta


def load_intervention(path: str | os.PathLike, model=None, *, check: bool = True) -> Intervention:
    """Rebuild the intervention saved at ``path`` (exactly: same class, spec and parameters).

    With ``model`` (and ``check=True``) a model whose fingerprint differs from the saved
    one is refused with a ValueError naming what differs (a save made without a model holds
    no fingerprint: then only the shapes are checked); the parameters are moved to the
    model's device. Never unpickles.
    """
    path = Path(path)
    meta = read_metadata(path)
    cls = KINDS.get(meta["kind"])
    if cls is None:
        raise ValueError(f"{path / META_FILE}: unknown kind {meta['kind']!r}; known kinds: {sorted(KINDS)}.")
    params_path = path / PARAMS_FILE
    if not params_path.is_file():
        raise FileNotFoundError(f"{params_path} is missing: the save at {path} is incomplete, write it again.")
    try:
        tensors = safetensors.torch.load_file(str(params_path), device="cpu")
    except safetensors.SafetensorError as e:
        raise ValueError(f"{params_path} is not a valid safetensors file ({e}); the save is corrupt.") from e
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
        n_pos=meta["n_pos"],
        init_std=meta.get("init_std", 0.0),
        seed=meta.get("seed", 0),
    )
    _fill_params(iv, tensors, meta, params_path)
    if model is not None:
        iv.check_model(model)
        iv.to(next(model.parameters()).device)
    return iv


def _fill_params(iv: Intervention, tensors: dict[str, torch.Tensor], meta: dict[str, Any], params_path: Path) -> None:
    if set(tensors) != set(iv.sites):
        raise ValueError(f"{params_path} holds tensors {sorted(tensors)}; the metadata names sites {list(iv.sites)}.")
    for site in iv.sites:
        t, want = tensors[site], iv.param_shape(site)
        saved = tuple(meta["params"].get(site, {}).get("shape", want))
        if tuple(t.shape) != want or saved != want:
            raise ValueError(
                f"{params_path}: {site!r} has shape {tuple(t.shape)} (metadata {saved}), but a {type(iv).__name__} "
                f"with this spec needs {want}; the save is corrupt or was edited."
            )
        grad = bool(meta["params"].get(site, {}).get("requires_grad", True)) and t.is_floating_point()
        iv.params[site] = torch.nn.Parameter(t, requires_grad=grad)
