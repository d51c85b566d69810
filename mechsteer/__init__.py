"""mechsteer: attribution and learned steering on TransformerLens' named hook points.

``import mechsteer as ms`` gives what users call::

    model = ms.load_model()                      # the embedded SmolLM2-135M-Instruct
    ds = ms.make_task("ioi", model, n=32)
    r = ms.activation_patching(model, ds, site="z", per_position=False)
    suite = ms.run_suite(model, ds, ["patching", "atp", "dla", "attnlrp"])
    iv = ms.ActivScalar.for_model(model, sites=["attn_out"], n_pos=ds.n_pos)
    history = ms.train(model, iv, *ds.split())

Names load on first use (PEP 562), so ``import mechsteer`` and the CLI start fast and
no submodule is imported before it is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["load_model", "describe", "fingerprint"], "mechsteer.models"),
    "tiny_model": "mechsteer.tiny",
    **dict.fromkeys(["make_task", "ccc", "ioi", "ContrastiveDataset", "build_dataset", "from_records", "load_records"],
                  "mechsteer.tasks"),
    **dict.fromkeys(["hooked", "hook_name", "Location", "SITES", "sites_for"], "mechsteer.sites"),
    **dict.fromkeys(["cache_at", "grad_at"], "mechsteer.runs"),
    **dict.fromkeys(
        ["activation_patching", "attribution_patching", "attribution_patching_all", "direct_logit_attribution",
         "direct_logit_attribution_all", "attnlrp", "compare", "run_suite", "Suite", "AttributionResult"],
        "mechsteer.attribution",
    ),
    **dict.fromkeys(
        ["Intervention", "ActivScalar", "SteerVec", "DynScalar", "steer", "TrainConfig", "train", "evaluate",
         "evaluate_splits", "steered_generate", "save_intervention", "load_intervention", "steer_task", "SteerRun"],
        "mechsteer.interventions",
    ),
    **dict.fromkeys(
        ["run_fv", "FVConfig", "FVRun", "FunctionVector", "DistributedFV", "mean_head_z", "aie", "function_vector",
         "inject_fv", "inject_dfv"],
        "mechsteer.fv",
    ),
    "Report": "mechsteer.report",
}
_ALIASES = {"dla": ("mechsteer.attribution", "direct_logit_attribution")}

__all__ = sorted([*_EXPORTS, *_ALIASES, "__version__"])

try:  # one source of truth: the version in pyproject.toml, as installed
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("mechsteer")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name], name
    elif name in _ALIASES:
        module, attr = _ALIASES[name]
    else:
        raise AttributeError(f"module 'mechsteer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
