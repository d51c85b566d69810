"""Attribution: which locations of a model carry a behaviour.

Four methods, each explaining a ``metric`` of the logits (a name of
``mechsteer.metrics.DATASET_METRICS``, default ``"logit_diff"``, or a callable
``metric(logits, ds) -> scalar``) on a ``ContrastiveDataset``, each returning an
``AttributionResult`` (scores over layer x position, layer x head, ...):

- ``activation_patching``: patch each location between clean and corrupted runs;
- ``attribution_patching`` / ``attribution_patching_all`` (AtP): its first-order estimate;
- ``direct_logit_attribution`` / ``direct_logit_attribution_all`` (DLA): direct terms;
  ``dla_per_position``: DLA at every (layer, position) (paper 003 Fig. 9, or the last
  position's direct term split over source positions);
- ``attnlrp``: layer-wise relevance propagation;
- ``atp_star`` / ``atp_star_all`` (AtP*: QK fix + GradDrop, also ``variant="atp*"``) and
  ``atp_ig_all`` (path-integrated AtP, ``variant="ig"``): AtP without its false negatives;
  ``false_negatives`` measures those against exact patching.

``compare`` draws results side by side and measures their agreement; ``run_suite`` runs
several methods on shared grids (``Suite``, with ``.write(out)``). Patching, AtP and the
suite default to ``direction="noising"``; ``result.method`` is the name ``run_suite``
takes (``"patching"``, ``"atp"``, ``"atp*"``, ``"atp-ig"``, ``"dla"``, ``"attnlrp"``).
"""

from mechsteer.attribution.atp import attribution_patching, attribution_patching_all
from mechsteer.attribution.atp_ig import atp_ig_all
from mechsteer.attribution.atp_star import atp_star, atp_star_all
from mechsteer.attribution.compare import compare
from mechsteer.attribution.dla import direct_logit_attribution, direct_logit_attribution_all, dla_terms
from mechsteer.attribution.dla_positions import dla_per_position
from mechsteer.attribution.lrp import attnlrp
from mechsteer.attribution.patching import activation_patching
from mechsteer.attribution.recall import false_negatives
from mechsteer.attribution.result import AttributionResult, stack_sites
from mechsteer.attribution.suite import Suite, run_suite

__all__ = [
    "AttributionResult",
    "Suite",
    "activation_patching",
    "atp_ig_all",
    "atp_star",
    "atp_star_all",
    "attnlrp",
    "attribution_patching",
    "attribution_patching_all",
    "compare",
    "direct_logit_attribution",
    "direct_logit_attribution_all",
    "dla_per_position",
    "dla_terms",
    "false_negatives",
    "run_suite",
    "stack_sites",
]
