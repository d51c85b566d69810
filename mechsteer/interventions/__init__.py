"""Learnable interventions (seed paper 003): ActivScalar, SteerVec, DynScalar, the
three-term objective Psi = E_m + lambda_F F + lambda_M M_1, training with Adam and the
Sec. 3.4 evaluation."""

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
from mechsteer.interventions.evaluate import (  # noqa: E402 (after objective, which it uses)
    NEGLIGIBLE,
    active_locations,
    evaluate,
    evaluate_splits,
    minimality_count,
)
from mechsteer.interventions.train import HISTORY_COLUMNS, TrainConfig, train
from mechsteer.interventions.io import KINDS, load_intervention, read_metadata, save_intervention
from mechsteer.interventions.generate import compare_generations, steered_generate
from mechsteer.interventions.interpret import beta_sweep, dynscalar_alphas, flip_beta, steervec_geometry
from mechsteer.interventions.plots import alpha_heatmap, beta_sweep_figure, dynscalar_figure, steervec_geometry_figure
from mechsteer.interventions.pareto import pareto_figure, pareto_front, pareto_grid, read_results
from mechsteer.interventions.from_attribution import (
    attribution_scalars,
    compare_with_trained,
    fit_beta,
    scalars_from_result,
)
from mechsteer.interventions.transfer import runs_on_length, transfer_figure, transfer_matrix

__all__ = [
    "attribution_scalars",
    "compare_with_trained",
    "fit_beta",
    "pareto_figure",
    "pareto_front",
    "pareto_grid",
    "read_results",
    "scalars_from_result",
    "alpha_heatmap",
    "beta_sweep",
    "beta_sweep_figure",
    "dynscalar_alphas",
    "dynscalar_figure",
    "flip_beta",
    "runs_on_length",
    "steervec_geometry",
    "steervec_geometry_figure",
    "transfer_figure",
    "transfer_matrix",
    "KINDS",
    "compare_generations",
    "load_intervention",
    "read_metadata",
    "save_intervention",
    "steered_generate",
    "ALLOWED_SITES",
    "HISTORY_COLUMNS",
    "NEGLIGIBLE",
    "TrainConfig",
    "active_locations",
    "evaluate",
    "evaluate_splits",
    "minimality_count",
    "train",
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
