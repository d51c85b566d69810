"""Function vectors (seed papers 000 and 004): which heads carry a task, and re-injecting them.

means (mean head activations) -> indirect_effect / scores (head selection by AIE, AttnLRP, AtP) ->
inject (FV at one layer, DFV at each head: the fixed-parameter interventions
``FunctionVector`` and ``DistributedFV``) -> evaluate (zero-shot accuracy) -> pipeline
(all of it per task, with timing). Tasks and prompts live in ``mechsteer.tasks.fv``.
"""

from mechsteer.fv.evaluate import (
    best_layer,
    compare_injections,
    fv_layer_sweep,
    steered_continuations,
    zero_shot_accuracy,
)
from mechsteer.fv.indirect_effect import aie, aie_global
from mechsteer.fv.inject import function_vector, inject_dfv, inject_fv, top_heads
from mechsteer.fv.means import mean_head_z
from mechsteer.fv.pipeline import FVConfig, FVRun, run_fv
from mechsteer.fv.scores import atp_head_scores, lrp_head_scores, rank_correlation
from mechsteer.fv.vectors import DistributedFV, FunctionVector

__all__ = [
    "DistributedFV",
    "FVConfig",
    "FVRun",
    "FunctionVector",
    "aie",
    "aie_global",
    "atp_head_scores",
    "best_layer",
    "compare_injections",
    "function_vector",
    "fv_layer_sweep",
    "inject_dfv",
    "inject_fv",
    "lrp_head_scores",
    "mean_head_z",
    "rank_correlation",
    "run_fv",
    "steered_continuations",
    "top_heads",
    "zero_shot_accuracy",
]
