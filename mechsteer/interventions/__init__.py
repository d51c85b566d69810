"""Learnable interventions (seed paper 003): ActivScalar, SteerVec, DynScalar and the
three-term objective Psi = E_m + lambda_F F + lambda_M M_1."""

from mechsteer.interventions.base import (
    ALLOWED_SITES,
    Intervention,
    plus_minus_batch,
    steer,
)
from mechsteer.interventions.objective import (
    ObjectiveTerms,
    clean_last_logits,
    effectiveness,
    faithfulness,
    minimality,
    objective,
    plus_minus_logits,
)
from mechsteer.interventions.scalars import ActivScalar, DynScalar
from mechsteer.interventions.vectors import SteerVec

__all__ = [
    "ALLOWED_SITES",
    "ActivScalar",
    "DynScalar",
    "Intervention",
    "ObjectiveTerms",
    "SteerVec",
    "clean_last_logits",
    "effectiveness",
    "faithfulness",
    "minimality",
    "objective",
    "plus_minus_batch",
    "plus_minus_logits",
    "steer",
]
