"""AttnLRP (Achtibat et al., 2024): layer-wise relevance propagation for transformers, as
gradient x input under value-identical rules placed on TransformerLens hook points.

``attnlrp(model, ds)`` returns relevances at the input tokens, at every layer's residual
stream / attention / MLP outputs, and on the attention weights per head, all from one
forward and one backward pass. ``lrp_rules(model)`` runs any forward under the rules.
The rules are in ``rules``, the passes in ``relevance``.
"""

from mechsteer.attribution.lrp import rules
from mechsteer.attribution.lrp.relevance import READOUTS, attnlrp, lrp_rules, rule_hooks

__all__ = ["READOUTS", "attnlrp", "lrp_rules", "rule_hooks", "rules"]
