"""Attribution: which locations of a model carry a behaviour. Every method returns an
``AttributionResult`` (scores over layer x position, layer x head, ...)."""

from mechsteer.attribution.result import AttributionResult, stack_sites

__all__ = ["AttributionResult", "stack_sites"]
