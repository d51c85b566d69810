"""Head scores for function vectors: which attention heads carry a task.

Three ways to score every head (l, h), all returning an ``AttributionResult`` over
``("layer", "head")`` with ``meta["samples_per_minute"]`` (a sample = one prompt scored
over all heads):

- **AIE** (Todd et al. 2024; paper 000 Sec. 3.1): patch the head's task mean into
  corrupted prompts and measure the rise of P(answer); one forward per head and prompt
  in the paper, batched one-token runs here (``aie``, ``aie_global``; see
  ``mechsteer.fv.indirect_effect``).
- **AttnLRP** (paper 000 Sec. 3.1, following Kahardipraja et al. 2025): on the clean
  instruction prompts, the relevance of the head's attention weights from the last
  position q to the instruction's intensional-frame tokens F (e.g. "opposite" in "Give the
  opposite word"), for the answer's logit f_y:

      R(l, h) = sum_{k in F} max(0, R(A^{l,h}_{q,k}))

  averaged over the prompts whose answer is among the model's top ``max_rank`` tokens
  (the paper's code skips the others; we read "rank below 5" as 1-based rank > 5, i.e.
  prompts with rank <= 5 are used). One forward + one backward pass per prompt group.
- **AtP** (attribution patching, not in the paper): the first-order estimate of each
  head's CIE from one forward + backward on the corrupted prompts,

      CIE_hat(l, h | p~) = dP(y | p~)/dz_{l,h}[-1] . (mean_z[l, h] - z_{l,h}[-1](p~))

  exact where P is linear in the head's output, poor where it saturates; use it to rank.

``rank_correlation`` compares two score grids (Spearman).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechsteer._validate import check_finite, positive_int
from mechsteer.attribution.compare import spearman
from mechsteer.attribution.lrp import attnlrp
from mechsteer.attribution.result import AttributionResult
from mechsteer.fv.indirect_effect import aie, aie_global
from mechsteer._validate import naming
from mechsteer.fv.means import check_mean_z, check_prompts
from mechsteer.metrics import answer_prob, answer_rank
from mechsteer.runs import grad_at, timer
from mechsteer.sites import hook_name, hooked
from mechsteer.tasks.fv import FVPrompts

__all__ = ["aie", "aie_global", "atp_head_scores", "lrp_head_scores", "rank_correlation"]


def lrp_head_scores(
    model,
    prompts: FVPrompts,
    *,
    max_rank: int = 5,
    batch_size: int = 32,
    variant: str = "attnlrp",
    per_prompt: bool = False,
    progress: bool = True,
) -> AttributionResult:
    """R(l, h) = mean over used prompts of sum_{k in frame} max(0, R(A^{l,h}[-1, k])),
    AttnLRP relevances for the answer's logit f_y (paper 000 Sec. 3.1).

    A prompt is used when its answer's 1-based rank at the last position is <= ``max_rank``
    (skipped otherwise; counts in ``meta["n_used"]``, ``meta["n_skipped"]``, the used
    prompts' indices in ``meta["used"]``; ``per_prompt`` rows follow ``meta["used"]``).
    Every prompt needs an intensional frame (``prompts.frames[n]``, token positions).
    ``samples_per_minute`` counts every prompt (skipped ones cost the same pass).

    >>> from mechsteer.tiny import tiny_model
    >>> from mechsteer.tasks.fv import FVPrompts
    >>> model = tiny_model("llama")
    >>> toks = [model.to_tokens("Opposite: hot ->")[0]]
    >>> top = model(toks[0][None])[0, -1].argmax()[None]  # the model's own top token
    >>> p = FVPrompts("antonym", "instruction", ["Opposite: hot ->"], toks, top, [[1, 2]], [0], ["hot"], ["cold"])
    >>> r = lrp_head_scores(model, p, progress=False)
    >>> r.axes, r.meta["n_used"], bool((r.scores >= 0).all())
    (('layer', 'head'), 1, True)
    """
    check_prompts(model, prompts)
    max_rank = positive_int("max_rank", max_rank)  # 1 = only prompts the model gets right
    batch_size = positive_int("batch_size", batch_size)
    empty = [i for i, f in enumerate(prompts.frames) if not f]
    if empty:
        raise ValueError(f"Prompts {empty[:5]} have no intensional frame (style {prompts.style!r}); LRP head scores "
                         "read attention to the frame tokens: use instruction prompts with frames.")
    cfg = model.cfg
    N = len(prompts)
    rel = torch.zeros(N, cfg.n_layers, cfg.n_heads)
    ranks = torch.zeros(N, dtype=torch.long)
    groups = list(prompts.batches(batch_size))
    with timer() as t:
        last: dict[str, Tensor] = {}

        def grab(x, hook):  # the same pass's logits, to apply the rank rule
            last["f"] = x.detach()[:, -1]

        for idx, tokens in tqdm(groups, desc="attnlrp heads", disable=not progress or len(groups) == 1):
            answers = prompts.answers[idx]
            with hooked(model, [(hook_name("logits", model=model), grab)]):
                r = attnlrp(model, tokens, metric="logit", answer=answers, readout="heads", query_pos=-1,
                            key_pos=[[int(k) for k in prompts.frames[i]] for i in idx], positive=True,
                            variant=variant, per_prompt=True, batch_size=len(idx), progress=False)
            rel[idx] = r.per_prompt
            ranks[idx] = answer_rank(last["f"], answers.to(last["f"].device)).cpu() + 1  # 1-based
    used = ranks <= max_rank
    n_used = int(used.sum())
    if n_used == 0:
        raise ValueError(f"No prompt's answer ranks within the top {max_rank} (ranks {ranks.tolist()[:10]}...); "
                         "the model does not do this task here: raise max_rank or filter the prompts first.")
    meta = {"task": prompts.task, "style": prompts.style, "n_prompts": N, "n_used": n_used, "n_skipped": N - n_used,
            "used": used.nonzero().squeeze(1).tolist(), "max_rank": max_rank, "variant": variant,
            "samples_per_minute": 60.0 * N / t["seconds"]}
    check_finite("lrp_head_scores: head relevances", rel[used])
    return AttributionResult(scores=rel[used].mean(0), axes=("layer", "head"), method="attnlrp", metric="logit",
                             seconds=t["seconds"], per_prompt=rel[used] if per_prompt else None, meta=meta)


def _atp_group(model, tokens, answers, mean_z) -> tuple[Tensor, Tensor]:
    """P(y | p~) (B,) and CIE_hat (B, layer, H) from one forward + backward
    (``runs.grad_at``: the zero delta sits at the last position only)."""
    sites = [("z", layer) for layer in range(model.cfg.n_layers)]
    p, z, grads = grad_at(model, tokens, sites, lambda logits: answer_prob(logits, answers, reduce="none"),
                          pos=-1, logits_to_keep=1)  # z, grads: (B, H, d_head) per layer
    est = [(grads[site] * (mean_z[layer] - z[site])).sum(-1) for layer, site in enumerate(sites)]  # (B, H) each
    return p, torch.stack(est, 1)


def atp_head_scores(
    model,
    corrupted: FVPrompts,
    mean_z: Float[Tensor, "layer head d_head"],
    *,
    batch_size: int = 32,
    per_prompt: bool = False,
    progress: bool = True,
) -> AttributionResult:
    """AtP estimate of AIE: mean over corrupted prompts p~ of
    dP(y | p~)/dz_{l,h}[-1] . (mean_z[l, h] - z_{l,h}[-1](p~)), one forward + backward per group.

    >>> from mechsteer.tiny import tiny_model
    >>> from mechsteer.tasks.fv import FVPrompts
    >>> model = tiny_model("gpt2")
    >>> toks = [model.to_tokens("Opposite: hot ->")[0]]
    >>> p = FVPrompts("antonym", "instruction/corrupted", ["Opposite: hot ->"], toks, torch.tensor([5]),
    ...               [[1]], [0], ["hot"], ["cold"])
    >>> r = atp_head_scores(model, p, torch.zeros(2, 4, 16), progress=False)
    >>> r.method, tuple(r.scores.shape)
    ('atp', (2, 4))
    """
    check_prompts(model, corrupted, "corrupted")
    check_mean_z(model, mean_z)
    batch_size = positive_int("batch_size", batch_size)
    cfg = model.cfg
    mean_z = mean_z.to(cfg.device)
    N = len(corrupted)
    est = torch.zeros(N, cfg.n_layers, cfg.n_heads)
    p_corr = torch.zeros(N)
    groups = list(corrupted.batches(batch_size))
    with timer() as t, naming("atp_head_scores"):
        for idx, tokens in tqdm(groups, desc="atp heads", disable=not progress or len(groups) == 1):
            p, e = _atp_group(model, tokens.to(cfg.device), corrupted.answers[idx].to(cfg.device), mean_z)
            est[idx], p_corr[idx] = e.cpu(), p.cpu()
    check_finite("atp_head_scores: P(answer) on the corrupted prompts", p_corr)
    check_finite("atp_head_scores: scores", est)
    meta = {"task": corrupted.task, "style": corrupted.style, "n_prompts": N, "p_corrupted": float(p_corr.mean()),
            "samples_per_minute": 60.0 * N / t["seconds"]}
    return AttributionResult(scores=est.mean(0), axes=("layer", "head"), method="atp", metric="P(answer)",
                             seconds=t["seconds"], per_prompt=est if per_prompt else None, meta=meta)


def rank_correlation(a: AttributionResult | Tensor, b: AttributionResult | Tensor) -> float:
    """Spearman rank correlation of two score grids over all their cells (average ranks
    for ties; ``mechsteer.attribution.compare.spearman``).

    >>> rank_correlation(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 3.0], [2.0, 4.0]]))
    0.8
    """
    def scores(r):
        return r.scores if isinstance(r, AttributionResult) else r

    if isinstance(a, AttributionResult) and isinstance(b, AttributionResult):
        la, lb = a.axis_labels("layer") if "layer" in a.axes else None, b.axis_labels("layer") if "layer" in b.axes else None
        if a.axes != b.axes or la != lb:
            raise ValueError(f"Cannot correlate {a.method} scores over {a.axes} (layers {la}) with {b.method} scores "
                             f"over {b.axes} (layers {lb}); score the same layers and heads, or select() them first.")
    sa, sb = scores(a), scores(b)
    if sa.shape != sb.shape:
        raise ValueError(f"Cannot correlate score grids of shapes {tuple(sa.shape)} and {tuple(sb.shape)}.")
    check_finite("rank_correlation: first score grid", sa)
    check_finite("rank_correlation: second score grid", sb)
    return spearman(sa.reshape(-1).float().cpu(), sb.reshape(-1).float().cpu())
