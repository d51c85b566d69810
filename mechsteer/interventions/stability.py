"""How stable a learned intervention is across refits (seed paper 003, Fig. 4 and Sec. 4.3).

Fig. 4 fits a SteerVec five times on the same prompt and compares the runs: "the vectors
converge to different directions every time, while changes in norm are more constant. We
quantify this using the Kendall correlation between the orderings of locations by the
change in norm as well as cosine distance between different runs." ``refit_stability``
does that for any kind: it trains one intervention per seed (the seed draws the
N(0, 1e-5) init of App. A.1 and the mini-batch order), then, for every pair of runs,

- ``kendall_tau``: scipy's Kendall tau-b between the runs' per-location effects, the
  ordering of locations (site, layer, pos[, head]) by effect. The effect is SteerVec's
  change in norm ||h + v|| / ||h|| - 1 on the clean activations (``steervec_geometry``,
  Fig. 4's left panel) and ActivScalar's alpha itself (its effect is h -> h (1 + alpha));
  DynScalar has no per-location parameter and is refused.
- ``cos_distance``: 1 - cos between the runs' whole parameter vectors vec(theta);
  for SteerVec also ``cos_distance_loc``, the mean over locations of 1 - cos(v_a, v_b)
  between the two runs' vectors at the same location (the paper's "different directions").

``summary()`` gives the mean and standard deviation over the 10 pairs of 5 seeds, which is
what the paper reports. Pass ``ds.subset([0])`` to fit on one prompt as Fig. 4 does.
Caveat, measured on SmolLM2: with std 1e-5, Adam's first steps (about lr each, sign of the
gradient) dwarf the init, so refits on one prompt land on nearly the same vectors; the
seed matters more with ``init_std="var"`` (std sqrt(1e-5)).

>>> from mechsteer.interventions.train import TrainConfig
>>> from mechsteer.tasks import ccc
>>> from mechsteer.tiny import tiny_model
>>> model = tiny_model("gpt2"); ds = ccc(model, n=4)
>>> st = refit_stability(model, ds, "steer_vec", ["mlp_out"], seeds=[0, 1, 2],
...                      config=TrainConfig(epochs=2, lr=1e-2, progress=False), progress=False)
>>> len(st.pairs), sorted(st.summary())[:3]
(3, ['cos_distance_loc_mean', 'cos_distance_loc_std', 'cos_distance_mean'])
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from scipy.stats import kendalltau
from tqdm.auto import tqdm

from mechsteer.interventions.base import DEFAULT_INIT_STD, Intervention
from mechsteer.interventions.evaluate import evaluate
from mechsteer.interventions.interpret import steervec_geometry
from mechsteer.interventions.kinds import kind_class
from mechsteer.interventions.positions import as_index
from mechsteer.interventions.scalars import ActivScalar
from mechsteer.interventions.train import TrainConfig, train
from mechsteer.interventions.vectors import SteerVec
from mechsteer.tasks.base import ContrastiveDataset

FIG4_SEEDS = (0, 1, 2, 3, 4)  # "fitting the steering vectors five times"


@dataclass
class Stability:
    """Refits of one intervention: per-seed effects and metrics, per-pair statistics."""

    method: str
    seeds: list[int]
    effects: pd.DataFrame  # one row per location, one column per seed (the per-location effect)
    pairs: pd.DataFrame  # seed_a, seed_b, kendall_tau, kendall_p, cos_distance[, cos_distance_loc]
    runs: pd.DataFrame  # per seed: effectiveness, faithfulness (E_0, F on ds) and minimality
    interventions: list[Intervention]

    def summary(self) -> dict[str, float]:
        """Mean and standard deviation over the pairs of each statistic (``*_mean``, ``*_std``)."""
        out = {}
        for col in self.pairs.columns:
            if col.startswith(("kendall_tau", "cos_distance")):
                out[f"{col}_mean"] = float(self.pairs[col].mean())
                out[f"{col}_std"] = float(self.pairs[col].std(ddof=0))
        return out


def location_effects(model, intervention: Intervention, ds: ContrastiveDataset, batch_size: int = 32) -> pd.Series:
    """The per-location effect ``refit_stability`` ranks: SteerVec's mean change in norm
    (``steervec_geometry``'s ``norm_change``), ActivScalar's alpha; indexed by location."""
    if isinstance(intervention, SteerVec):
        g = steervec_geometry(model, intervention, ds, batch_size=batch_size, progress=False)
        index = pd.MultiIndex.from_frame(g[["site", "layer", "pos", "head"]].astype(str))
        return pd.Series(g["norm_change"].to_numpy(), index=index, name="norm_change")
    if isinstance(intervention, ActivScalar):
        values, keys = [], []
        for s in intervention.sites:
            a = intervention.alpha(s).detach().float().cpu()  # (L, P) or (L, P, H)
            for idx in itertools.product(*(range(n) for n in a.shape)):
                keys.append((s, str(intervention.layers[idx[0]]), str(idx[1]), str(idx[2]) if len(idx) > 2 else "<NA>"))
                values.append(float(a[idx]))
        index = pd.MultiIndex.from_tuples(keys, names=["site", "layer", "pos", "head"])
        return pd.Series(values, index=index, name="alpha")
    raise TypeError(f"Per-location effects are defined for SteerVec and ActivScalar, got {type(intervention).__name__}.")


def _cos_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos(a, b) along the last axis, in float64 (0 for identical vectors)."""
    a, b = a.double(), b.double()
    return 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(torch.finfo(torch.float64).tiny)


def refit_stability(
    model,
    ds: ContrastiveDataset,
    method: str = "steer_vec",
    sites: Sequence[str] = ("resid_post",),  # Fig. 4: residPost
    *,
    seeds: Sequence[int] = FIG4_SEEDS,
    config: TrainConfig = TrainConfig(),
    layers: Sequence[int] | None = None,
    positions: str | Sequence[int] = "all",
    init_std: float | str = DEFAULT_INIT_STD,  # App. A.1's N(0, 1e-5) as std ("std") or variance ("var")
    batch_size: int = 32,
    progress: bool = True,
) -> Stability:
    """Fit ``method`` on ``ds`` once per seed (init and batch order) and compare the runs:
    Kendall tau of the per-location effects and cosine distance of the parameters, per pair
    of seeds (see the module docstring). Returns a ``Stability``."""
    cls = kind_class(method)
    if cls not in (SteerVec, ActivScalar):
        raise ValueError(f"method must be 'steer_vec' or 'activ_scalar' (per-location parameters), got {method!r}.")
    if not isinstance(ds, ContrastiveDataset):
        raise TypeError(f"ds must be a ContrastiveDataset, got {type(ds).__name__}.")
    seeds = [as_index("seeds", s) for s in seeds]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must hold at least two distinct seeds, got {seeds}.")
    ivs, effects, runs = [], {}, []
    for seed in tqdm(seeds, desc="refits", disable=not progress):
        iv = cls.for_dataset(model, ds, sites=sites, layers=layers, positions=positions, seed=seed, init_std=init_std)
        train(model, iv, ds, dataclasses.replace(config, seed=seed))
        ivs.append(iv)
        effects[seed] = location_effects(model, iv, ds, batch_size)
        m = evaluate(model, iv, ds, batch_size)
        runs.append({"seed": seed, **{k: m[k] for k in ("effectiveness", "faithfulness", "minimality")}})
    rows = []
    for (i, a), (j, b) in itertools.combinations(enumerate(seeds), 2):
        tau, p = kendalltau(effects[a].to_numpy(), effects[b].to_numpy())
        va = torch.cat([x.detach().flatten() for x in ivs[i].params.values()])
        vb = torch.cat([x.detach().flatten() for x in ivs[j].params.values()])
        row = {"seed_a": a, "seed_b": b, "kendall_tau": float(tau), "kendall_p": float(p),
               "cos_distance": float(_cos_distance(va, vb))}
        if cls is SteerVec:  # per location: the vectors' directions
            row["cos_distance_loc"] = float(torch.cat([
                _cos_distance(ivs[i].params[s].detach(), ivs[j].params[s].detach()).flatten() for s in ivs[i].sites
            ]).mean())
        rows.append(row)
    pairs = pd.DataFrame(rows)
    if pairs[["kendall_tau", "cos_distance"]].isna().any().any():
        raise FloatingPointError("refit_stability: a Kendall tau or cosine distance is NaN (constant effects or "
                                 "zero parameters: train longer or with a larger lr).")
    return Stability(method, seeds, pd.DataFrame(effects), pairs, pd.DataFrame(runs), ivs)
