"""Learnable interventions (seed paper 003): ActivScalar, SteerVec, DynScalar, the
three-term objective Psi = E_m + lambda_F F + lambda_M M_1, training with Adam and the
Sec. 3.4 evaluation.

What users call is here; the pieces underneath stay in their modules (the objective's
terms in ``objective``, the registry of kinds in ``kinds``, the Pareto rows' checks in
``pareto``, ...).
"""

from mechsteer.interventions.base import Intervention, steer
from mechsteer.interventions.scalars import ActivScalar, DynScalar
from mechsteer.interventions.vectors import SteerVec
from mechsteer.interventions.train import TrainConfig, train
from mechsteer.interventions.evaluate import evaluate, evaluate_splits
from mechsteer.interventions.io import load_intervention, read_metadata, save_intervention
from mechsteer.interventions.generate import compare_generations, steered_generate
from mechsteer.interventions.interpret import beta_sweep, dynscalar_alphas, flip_beta, steervec_geometry
from mechsteer.interventions.plots import alpha_heatmap, beta_sweep_figure, dynscalar_figure, steervec_geometry_figure
from mechsteer.interventions.pareto import pareto_figure, pareto_front, pareto_grid, read_results
from mechsteer.interventions.pareto_run import ParetoRun, pareto_search
from mechsteer.interventions.from_attribution import (
    attribution_scalars,
    compare_with_trained,
    fit_beta,
    scalars_from_result,
)
from mechsteer.interventions.beta_search import choose_beta, sweep_beta, sweep_betas
from mechsteer.interventions.stability import Stability, location_effects, refit_stability
from mechsteer.interventions.transfer import template_table, transfer_figure, transfer_matrix
from mechsteer.interventions.pipeline import SteerRun, steer_task

__all__ = [
    "Stability",
    "choose_beta",
    "location_effects",
    "refit_stability",
    "sweep_beta",
    "sweep_betas",
    "template_table",
    "ActivScalar",
    "DynScalar",
    "Intervention",
    "ParetoRun",
    "SteerRun",
    "SteerVec",
    "TrainConfig",
    "alpha_heatmap",
    "attribution_scalars",
    "beta_sweep",
    "beta_sweep_figure",
    "compare_generations",
    "compare_with_trained",
    "dynscalar_alphas",
    "dynscalar_figure",
    "evaluate",
    "evaluate_splits",
    "fit_beta",
    "flip_beta",
    "load_intervention",
    "pareto_figure",
    "pareto_front",
    "pareto_grid",
    "pareto_search",
    "read_metadata",
    "read_results",
    "save_intervention",
    "scalars_from_result",
    "steer",
    "steer_task",
    "steered_generate",
    "steervec_geometry",
    "steervec_geometry_figure",
    "train",
    "transfer_figure",
    "transfer_matrix",
]
