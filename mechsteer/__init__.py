"""mechsteer: attribution and learned steering on TransformerLens' named hook points."""

from mechsteer.models import describe, fingerprint, load_model

try:  # one source of truth: the version in pyproject.toml, as installed
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("mechsteer")
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"
__all__ = ["load_model", "describe", "fingerprint", "__version__"]
