"""Reading learned interventions: the numbers behind the figures (seed paper 003, Figs. 3-5).

- ``beta_sweep``: the mean logit difference f_c - f_w (and its spread, accuracy, both
  logits) for each beta in [-2, 2]; an effective intervention crosses zero between
  beta = -1 and +1, and ``flip_beta`` interpolates where.
- ``steervec_geometry`` (Fig. 4): how a SteerVec moves each activation, as the relative
  change in norm ||h~||/||h|| - 1 and the cosine distance 1 - cos(h, h~), averaged over
  prompts. h is the *clean* activation (recorded at the intervened sites, no steering) and
  h~ = h + beta v: the geometry of each vector on its own, without the upstream edits
  that also move h in a steered run.
- ``dynscalar_alphas`` (Fig. 5): a DynScalar's alpha = g^T h/||h|| on each prompt's clean
  activations (the probe's reading on the unsteered model, any prompt length).

``mechsteer.interventions.plots`` draws them.

>>> import pandas as pd
>>> flip_beta(pd.DataFrame({"beta": [-1.0, 0.0, 1.0], "logit_diff": [-2.0, -1.0, 1.0]}))
0.5
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechsteer.interventions.base import Intervention
from mechsteer.interventions.objective import answer_logits
from mechsteer.interventions.train import batch_view, dataset_tensors
from mechsteer.interventions.scalars import DynScalar
from mechsteer.interventions.vectors import SteerVec
from mechsteer.metrics import logit_diff
from mechsteer.runs import cache_at
from mechsteer.tasks.base import ContrastiveDataset

DEFAULT_BETAS = torch.arange(-10, 11) / 5  # beta in [-2, 2] in steps of 0.2, with an exact 0
SWEEP_COLUMNS = ["beta", "logit_diff", "logit_diff_std", "accuracy", "logit_correct", "logit_wrong"]


def _positions(iv: Intervention, n_pos: int | None) -> list[int] | None:
    """Token positions of the intervention's parameters/edits (None: 'last' of unknown length)."""
    if iv.positions == "all":
        return list(range(n_pos))
    if iv.positions == "last":
        return [n_pos - 1] if n_pos is not None else None
    return list(iv.positions)


@torch.no_grad()
def beta_sweep(
    model,
    intervention: Intervention,
    ds: ContrastiveDataset,
    betas: Float[Tensor, " n_beta"] | Sequence[float | int] = DEFAULT_BETAS,
    batch_size: int = 32,  # sequences per forward: one (prompt, beta) pair each
    progress: bool = True,
) -> pd.DataFrame:
    """Mean (and sample std) of f_c - f_w over ``ds`` at each beta, the accuracy (share of
    prompts with f_c > f_w) and the mean logits f_c, f_w. beta = 0 is the clean model.
    Every (prompt, beta) pair is one sequence; ``batch_size`` of them run per forward.

    >>> from mechsteer.tasks import ccc
    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2"); ds = ccc(model, n=4)
    >>> iv = DynScalar.for_model(model, sites=["mlp_out"])
    >>> beta_sweep(model, iv, ds, betas=[-1, 0, 1], progress=False).shape
    (3, 6)
    """
    betas = torch.as_tensor(betas, dtype=torch.float32).flatten()
    if betas.numel() == 0 or batch_size < 1:
        raise ValueError(f"beta_sweep needs at least one beta and batch_size >= 1 (got {betas.numel()}, {batch_size}).")
    device = next(model.parameters()).device
    intervention.to(device)
    n, k = len(ds), betas.numel()
    tokens, correct, wrong, pos, where = dataset_tensors(model, intervention, ds)
    rep = lambda x: x.repeat(k, *([1] * (x.ndim - 1))) if isinstance(x, Tensor) else x  # noqa: E731
    tokens, correct, wrong, pos, where = (rep(x) for x in (tokens, correct, wrong, pos, where))  # every prompt at every beta
    beta_all = betas.to(device).repeat_interleave(n)  # (k N,)
    fc, fw, ld = [], [], []
    for i in tqdm(range(0, k * n, batch_size), desc="beta sweep", disable=not progress):
        sl = slice(i, i + batch_size)
        t, p, w = batch_view(tokens, pos, where, sl)
        with intervention.apply(model, beta_all[sl], where=w):
            logits = answer_logits(model, t, p).float()  # (b, V) at each prompt's last token
        fc.append(logits.gather(-1, correct[sl, None])[:, 0].cpu())
        fw.append(logits.gather(-1, wrong[sl, None])[:, 0].cpu())
        ld.append(logit_diff(logits, correct[sl], wrong[sl], reduce="none").cpu())
    fc, fw, ld = (torch.cat(x).view(k, n) for x in (fc, fw, ld))  # (k, N) each
    return pd.DataFrame(
        {
            "beta": betas.tolist(),
            "logit_diff": ld.mean(1).tolist(),
            "logit_diff_std": ld.std(1, correction=1 if n > 1 else 0).tolist(),
            "accuracy": (ld > 0).float().mean(1).tolist(),
            "logit_correct": fc.mean(1).tolist(),
            "logit_wrong": fw.mean(1).tolist(),
        },
        columns=SWEEP_COLUMNS,
    )


def flip_beta(df: pd.DataFrame) -> float:
    """The beta where the mean logit difference crosses zero (linear interpolation between
    the sweep's betas; the crossing nearest beta = 0 if several), NaN if it never does."""
    d = df.sort_values("beta")
    b, y = d["beta"].to_numpy(float), d["logit_diff"].to_numpy(float)
    hits = [b[i] for i in range(len(b)) if y[i] == 0]
    for i in range(len(b) - 1):
        if y[i] * y[i + 1] < 0:
            hits.append(b[i] - y[i] * (b[i + 1] - b[i]) / (y[i + 1] - y[i]))
    return float(min(hits, key=abs)) if hits else float("nan")

def _order(iv: Intervention) -> list[tuple[str, int]]:
    """(site, layer index) keys in the intervention's order (hooks fire in model order)."""
    return [(s, li) for s in iv.sites for li in range(len(iv.layers))]


def _clean_acts(model, iv: Intervention, tokens) -> dict[tuple[str, int], Tensor]:
    """Clean activations at every (site, layer index) the intervention edits (one unsteered
    forward through the run layer)."""
    keys = {(s, l): (s, li) for s in iv.sites for li, l in enumerate(iv.layers)}  # (site, layer) -> (site, index)
    _, acts = cache_at(model, tokens, list(keys), logits_to_keep=1)  # the logits are not read
    return {keys[k]: a for k, a in acts.items()}


def _frame(site: str, layer: int, pos: list[int], labels: list[str], values: dict[str, np.ndarray]) -> pd.DataFrame:
    """Rows (site, layer, pos[, head]) from (P,) or (P, H) arrays; head is <NA> off ``z``."""
    first = next(iter(values.values()))
    n_heads = first.shape[1] if first.ndim == 2 else 1
    p = np.repeat(np.asarray(pos), n_heads)
    head = pd.array(np.tile(np.arange(n_heads), len(pos)) if first.ndim == 2 else [pd.NA] * len(pos), dtype="Int64")
    out = {"site": site, "layer": layer, "pos": p, "head": head, "token": [labels[i] for i in p]}
    return pd.DataFrame({**out, **{k: v.reshape(-1) for k, v in values.items()}})


@torch.no_grad()
def steervec_geometry(
    model, intervention: SteerVec, ds: ContrastiveDataset, beta: float | int = 1.0, batch_size: int = 32,
    progress: bool = True,
) -> pd.DataFrame:
    """Fig. 4: per location (site, layer, pos[, head]) the mean over prompts of
    ||h~||/||h|| - 1 (``norm_change``) and 1 - cos(h, h~) (``cos_change``), h~ = h + beta v
    on the clean h. 1 - cos is computed as ||h/||h|| - h~/||h~||||^2 / 2 (exact 0 when h~ = h).

    >>> from mechsteer.tasks import ccc
    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2"); ds = ccc(model, n=4)
    >>> iv = SteerVec.for_model(model, sites=["mlp_out"], positions="last", n_pos=ds.n_pos)
    >>> steervec_geometry(model, iv, ds, progress=False).columns.tolist()
    ['site', 'layer', 'pos', 'head', 'token', 'norm_change', 'cos_change']
    """
    if not isinstance(intervention, SteerVec):
        raise TypeError(f"steervec_geometry reads SteerVec vectors; got {type(intervention).__name__}.")
    if intervention.slots is None and intervention.n_pos is not None and intervention.n_pos != ds.n_pos:
        raise ValueError(f"The SteerVec was built for {intervention.n_pos} tokens; ds has n_pos={ds.n_pos}.")
    intervention.check_model(model)
    device = next(model.parameters()).device
    intervention.to(device)
    where = intervention.token_index(ds)  # (N, P) per prompt, or None: the columns below
    if where is None:
        pos, labels = _positions(intervention, ds.n_pos), ds.labels
        where = torch.tensor(pos).expand(len(ds), -1)
    else:
        pos = list(range(where.shape[1]))
        labels = list(intervention.slots) if intervention.slots is not None else (
            ["end"] if intervention.positions == "last" else [str(p) for p in intervention.positions])
    count = (where >= 0).sum(0).clamp(min=1).to(device)  # (P,) prompts having each position
    sums: dict[tuple[str, int], list[Tensor]] = {}
    for i in tqdm(range(0, len(ds), batch_size), desc="steervec geometry", disable=not progress):
        w = where[i : i + batch_size].to(device)
        acts = _clean_acts(model, intervention, ds.tokens[i : i + batch_size].to(device))
        for (s, li), h in acts.items():
            present = (w >= 0).view(*w.shape, *([1] * (h.ndim - 3))).double()  # (B, P[, H])
            h = h.gather(1, w.clamp(min=0).view(*w.shape, *([1] * (h.ndim - 2))).expand(*w.shape, *h.shape[2:]))
            h = h.double()  # (B, P, *tail) at each prompt's own tokens
            ht = intervention.edit(s, li, h, torch.full((h.shape[0],), float(beta), dtype=h.dtype, device=h.device))
            n0, n1 = h.norm(dim=-1, keepdim=True), ht.norm(dim=-1, keepdim=True)  # (B, P[, H], 1)
            tiny = torch.finfo(h.dtype).tiny
            norm = (n1 / n0.clamp_min(tiny) - 1)[..., 0]
            cos = (h / n0.clamp_min(tiny) - ht / n1.clamp_min(tiny)).pow(2).sum(-1) / 2
            acc = sums.setdefault((s, li), [0, 0])
            acc[0], acc[1] = acc[0] + (norm * present).sum(0), acc[1] + (cos * present).sum(0)
    c = lambda a: (a / count.view(-1, *([1] * (a.ndim - 1)))).cpu().numpy()  # noqa: E731 (mean over present)
    frames = [
        _frame(s, intervention.layers[li], pos, labels, {"norm_change": c(a[0]), "cos_change": c(a[1])})
        for (s, li), a in ((key, sums[key]) for key in _order(intervention))
    ]
    return pd.concat(frames, ignore_index=True)

@torch.no_grad()
def dynscalar_alphas(
    model, intervention: DynScalar, prompts: Sequence[str], progress: bool = True
) -> list[pd.DataFrame]:
    """Fig. 5: alpha_{l,i} = g_l^T h_{l,i}/||h_{l,i}|| on each prompt's clean activations,
    one DataFrame per prompt (columns prompt, site, layer, pos, head, token, alpha).

    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2")
    >>> iv = DynScalar.for_model(model, sites=["attn_out", "z"])
    >>> frames = dynscalar_alphas(model, iv, ["The capital of", " Paris"], progress=False)
    >>> [f["pos"].nunique() for f in frames], frames[1].columns.tolist()
    ([4, 2], ['prompt', 'site', 'layer', 'pos', 'head', 'token', 'alpha'])
    """
    if not isinstance(intervention, DynScalar):
        raise TypeError(f"dynscalar_alphas reads DynScalar probes; got {type(intervention).__name__}.")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got one string; wrap it in a list.")
    intervention.check_model(model)
    device = next(model.parameters()).device
    intervention.to(device)
    out = []
    for k, prompt in enumerate(tqdm(prompts, desc="dynscalar alphas", disable=not progress)):
        tokens = model.to_tokens(prompt).to(device)  # (1, T)
        labels = [f"{i}:{model.tokenizer.decode([t])}" for i, t in enumerate(tokens[0].tolist())]
        pos = _positions(intervention, tokens.shape[1])
        acts = _clean_acts(model, intervention, tokens)
        frames = [
            _frame(
                s,
                intervention.layers[li],
                pos,
                labels,
                {"alpha": intervention.alpha(s, li, h[0, pos]).float().cpu().numpy()},
            )
            for (s, li), h in ((key, acts[key]) for key in _order(intervention))
        ]
        df = pd.concat(frames, ignore_index=True)
        df.insert(0, "prompt", k)
        out.append(df)
    return out
