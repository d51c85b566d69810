"""AtP, AtP* and path-integrated AtP against exact patching: cost and false negatives.

For each task (IOI and CCC, ``mechsteer.tasks.make_task(task, model, n=--n)``), one run of
each method on the suite's grids (``heads``: each head's z at all positions; ``attn_out``
and ``mlp_out``: per layer and position), all in the default noising direction:

- ``patching``: ``activation_patching`` (z per head with per_position=False; attn_out and
  mlp_out per position), the reference;
- ``atp``: ``attribution_patching_all`` (attn_out, mlp_out, z);
- ``atp*``: ``atp_star_all`` (QK fix + GradDrop; z as whole heads, ``head_totals=True``);
- ``atp-ig4``, ``atp-ig8``: ``atp_ig_all`` with K = 4, 8 path points;
- ``qk_plain`` / ``qk_fix``: AtP on the q and k nodes without and with the QK fix (no
  GradDrop): the QK fix's own cost (it has no exact-patching reference here).

Cost: wall time over one plain forward of the same batch (``plain_forward_seconds``, median
of 3), one repetition each (a shared machine: other jobs only add time). Quality, per grid
and estimate: false negatives among the true top-10 / top-20 by |exact| (``false_negatives``:
how many fall outside the estimate's own top-k, and the latest rank it gives one), and the
Spearman correlation with exact patching (signed scores, ``compare.spearman``).

    python benchmarks/bench_atp_star.py [--model tiny|smollm2] [--n 16] [--tasks ioi,ccc]
"""

from __future__ import annotations

import argparse
import time

from _common import load, machine_info, write_result

from mechsteer.attribution import activation_patching, atp_ig_all, atp_star_all, attribution_patching_all, false_negatives
from mechsteer.attribution.compare import spearman
from mechsteer.runs import plain_forward_seconds
from mechsteer.tasks import make_task

GRIDS = ("heads", "attn_out", "mlp_out")


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_task(model, task: str, n: int) -> dict:
    ds = make_task(task, model, n=n)
    fwd = plain_forward_seconds(model, ds.tokens)
    sites = ("attn_out", "mlp_out", "z")
    res, secs = {}, {}
    (heads, both), secs["patching"] = _timed(lambda: (
        activation_patching(model, ds, site="z", per_position=False, progress=False),
        activation_patching(model, ds, site=["attn_out", "mlp_out"], progress=False)))
    res["patching"] = {"heads": heads, "attn_out": both.select(site="attn_out"), "mlp_out": both.select(site="mlp_out")}
    out, secs["atp"] = _timed(lambda: attribution_patching_all(model, ds, sites=sites))
    res["atp"] = {"heads": out["z"].sum("pos"), "attn_out": out["attn_out"], "mlp_out": out["mlp_out"]}
    out, secs["atp*"] = _timed(lambda: atp_star_all(model, ds, sites=sites, head_totals=True))
    res["atp*"] = {"heads": out["z"], "attn_out": out["attn_out"], "mlp_out": out["mlp_out"]}
    for k in (4, 8):
        out, secs[f"atp-ig{k}"] = _timed(lambda: atp_ig_all(model, ds, sites=sites, steps=k))
        res[f"atp-ig{k}"] = {"heads": out["z"].sum("pos"), "attn_out": out["attn_out"], "mlp_out": out["mlp_out"]}
    qk_plain, secs["qk_plain"] = _timed(lambda: atp_star_all(model, ds, sites=("q", "k"), qk_fix=False, grad_drop=False))
    qk_fix, secs["qk_fix"] = _timed(lambda: atp_star_all(model, ds, sites=("q", "k"), grad_drop=False))
    quality = {}
    for m in ("atp", "atp*", "atp-ig4", "atp-ig8"):
        for g in GRIDS:
            exact, est = res["patching"][g], res[m][g]
            fn = false_negatives(exact, est, ks=(10, 20))
            quality[f"{g}/{m}"] = {
                "spearman": spearman(exact.flat(), est.flat()),
                "spearman_abs": spearman(exact.flat().abs(), est.flat().abs()),
                **{f"top{r.k}_missed": r.missed for r in fn.itertuples()},
                **{f"top{r.k}_worst_rank": r.worst_rank for r in fn.itertuples()},
                "top10_ranks": fn.ranks[0],
            }
    # the goal: AtP* keeps every true top-10 head that AtP finds and recovers those AtP misses
    fn_atp = false_negatives(res["patching"]["heads"], res["atp"]["heads"], ks=(10,)).iloc[0]
    fn_star = false_negatives(res["patching"]["heads"], res["atp*"]["heads"], ks=(10,)).iloc[0]
    found = lambda r: {loc for loc, rank in zip(r.locations, r.ranks) if rank <= 10}  # noqa: E731
    qk_change = (qk_fix["q"].scores - qk_plain["q"].scores).abs().max().item(), \
        (qk_fix["k"].scores - qk_plain["k"].scores).abs().max().item()
    return {
        "n": len(ds), "n_pos": ds.n_pos, "plain_forward_seconds": fwd,
        "seconds": secs, "forward_equivalents": {m: s / fwd for m, s in secs.items()},
        "patching_forwards": heads.meta["forwards"] + both.meta["forwards"],
        "quality": quality,
        "heads_top10_found_by_atp_missed_by_atp*": sorted(found(fn_atp) - found(fn_star)),
        "heads_top10_missed_by_atp_found_by_atp*": sorted(found(fn_star) - found(fn_atp)),
        "qk_fix_max_change_q_k": qk_change,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--n", type=int, default=16, help="prompts per task")
    ap.add_argument("--tasks", default="ioi,ccc")
    ap.add_argument("--out", default="benchmarks/results/atp_star.json")
    args = ap.parse_args()
    model = load(args.model)
    result = {"model": getattr(model.cfg, "model_name", args.model), "tasks": {}}
    for task in args.tasks.split(","):
        start = time.perf_counter()
        result["tasks"][task] = run_task(model, task, args.n)
        print(task, f"{time.perf_counter() - start:.0f}s", result["tasks"][task]["forward_equivalents"], flush=True)
    result["machine"] = machine_info()
    write_result(args.out, result)


if __name__ == "__main__":
    main()
