"""mechsteer: attribution and learned steering on TransformerLens' named hook points."""

from mechsteer.models import describe, fingerprint, load_model

__version__ = "0.1.0"
__all__ = ["load_model", "describe", "fingerprint", "__version__"]
