"""The trainable intervention kinds, by the name users pass (``method="steer_vec"``).

One registry for every place that turns a name into a class: ``steer_task``, the Pareto
search, the CLI's ``--method`` choices and ``load_intervention`` (a save's ``meta.json``
stores the class name, ``ActivScalar``; ``kind_of_class`` reads it back). Fixed-parameter
interventions (FV / DFV in ``mechsteer.fv``) are not trainable and are not listed here.

>>> sorted(KINDS)
['activ_scalar', 'dyn_scalar', 'steer_vec']
>>> kind_class("steer_vec").__name__, kind_name(kind_class("dyn_scalar"))
('SteerVec', 'dyn_scalar')
"""

from __future__ import annotations

from mechsteer.interventions.base import Intervention
from mechsteer.interventions.scalars import ActivScalar, DynScalar
from mechsteer.interventions.vectors import SteerVec

KINDS: dict[str, type[Intervention]] = {"activ_scalar": ActivScalar, "steer_vec": SteerVec, "dyn_scalar": DynScalar}


def kind_class(kind: str, name: str = "method") -> type[Intervention]:
    """The class registered as ``kind``; ValueError naming ``name`` and the choices otherwise."""
    if kind not in KINDS:
        raise ValueError(f"Unknown {name} {kind!r}; choose one of {', '.join(KINDS)}.")
    return KINDS[kind]


def kind_name(cls: type[Intervention]) -> str | None:
    """The registry name of ``cls`` (exact class, not a subclass), or None if unregistered."""
    return next((k for k, c in KINDS.items() if c is cls), None)


def kind_of_class(class_name: str) -> type[Intervention] | None:
    """The registered class called ``class_name`` (``"ActivScalar"``), or None."""
    return next((c for c in KINDS.values() if c.__name__ == class_name), None)
