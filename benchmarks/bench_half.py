"""Half precision (bf16) vs float32: per-head agreement and speed of every attribution method.

Loads the model twice (``mechsteer.load_model(dtype=torch.float32)`` and
``dtype=torch.bfloat16``), builds the same IOI batch (``ioi(model, n=--n)``) and runs each
method's per-head scores in both: activation patching (site ``z``, ``per_position=False``),
AtP, AtP* and AtP-IG (site ``z``, ``head_totals=True``), DLA (site ``z``) and AttnLRP
(``readout="heads"``). For each method it reports the Spearman rank correlation of the
bf16 scores with the float32 ones, the Jaccard overlap of the top-20 heads by |score|,
Spearman over the heads whose float32 |score| exceeds ``--floor`` (ranks of near-zero
scores are rounding noise), the largest |bf16 - float32| difference, NaN/inf, and the
median wall time of ``--reps`` runs in each dtype (after one warm-up plain forward) with
their ratio. DLA also reports the largest miss of its terms' sum against the logit
difference, relative to ``dla.sum_tolerance``.

    OMP_NUM_THREADS=2 python benchmarks/bench_half.py [--model smollm2|tiny] [--n 8] [--reps 1]
"""

from __future__ import annotations

import statistics
import time

import torch
from _common import machine_info, parse_args, write_result

import mechsteer
from mechsteer.attribution import (
    activation_patching,
    attnlrp,
    attribution_patching_all,
    direct_logit_attribution,
    dla,
)
from mechsteer.attribution.atp_ig import atp_ig_all
from mechsteer.attribution.atp_star import atp_star_all
from mechsteer.attribution.compare import spearman
from mechsteer.tasks import ioi

METHODS = {
    "patching": lambda m, ds: activation_patching(m, ds, site="z", per_position=False, progress=False),
    "atp": lambda m, ds: attribution_patching_all(m, ds, sites=("z",), head_totals=True)["z"],
    "atp*": lambda m, ds: atp_star_all(m, ds, sites=("z",), head_totals=True)["z"],
    "atp-ig": lambda m, ds: atp_ig_all(m, ds, sites=("z",), head_totals=True)["z"],
    "dla": lambda m, ds: direct_logit_attribution(m, ds, site="z"),
    "attnlrp": lambda m, ds: attnlrp(m, ds, readout="heads", progress=False),
}


def top(x: torch.Tensor, k: int = 20) -> set:
    return set(x.abs().topk(min(k, len(x))).indices.tolist())


def dla_miss(model, ds) -> float:
    """Largest |sum of DLA terms - logit difference| over prompts, as a fraction of its tolerance."""
    run = dla._run_dla(model, ds, "logit_diff", sources=False)
    terms = torch.cat([run.embed[:, None], dla._head_scores(run).flatten(1), run.attn_bias, run.mlp,
                       run.unembed_bias[:, None]], 1)
    tol = dla.sum_tolerance(terms, run.metric, next(model.parameters()).dtype)
    return float(((terms.sum(1) - run.metric).abs() / tol).max())


def main() -> None:
    ap_args = parse_args(__doc__, "half", n=8, reps=1)  # --model, --n, --reps, --out
    scores, seconds, miss = {}, {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        model = mechsteer.load_model("tiny-llama").to(dtype) if ap_args.model == "tiny" else \
            mechsteer.load_model(dtype=dtype)
        ds = ioi(model, n=ap_args.n)
        with torch.no_grad():
            model(ds.tokens)  # warm-up
        for name, fn in METHODS.items():
            times = []
            for _ in range(ap_args.reps):
                start = time.perf_counter()
                r = fn(model, ds)
                times.append(time.perf_counter() - start)
            scores[name, dtype] = r.scores.flatten().float()
            seconds[name, dtype] = statistics.median(times)
            print(f"{name:9s} {str(dtype):15s} {seconds[name, dtype]:7.2f} s", flush=True)
        miss[dtype] = dla_miss(model, ds)
    rows = []
    for name in METHODS:
        a, b = scores[name, torch.float32], scores[name, torch.bfloat16]
        big = a.abs() > FLOOR
        rows.append({
            "method": name,
            "spearman": spearman(a, b),
            "jaccard_top20": len(top(a) & top(b)) / len(top(a) | top(b)),
            "spearman_above_floor": spearman(a[big], b[big]) if int(big.sum()) > 2 else float("nan"),
            "n_above_floor": int(big.sum()), "n_heads": len(a),
            "max_abs_diff": float((a - b).abs().max()), "median_abs_f32": float(a.abs().median()),
            "finite": bool(b.isfinite().all()),
            "seconds_f32": seconds[name, torch.float32], "seconds_bf16": seconds[name, torch.bfloat16],
            "ratio": seconds[name, torch.bfloat16] / seconds[name, torch.float32],
        })
    print("\n| method | Spearman | Jaccard top-20 | Spearman (|s| > %g) | max abs diff | float32 s | bf16 s | bf16/f32 |" % FLOOR)
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['spearman']:.3f} | {r['jaccard_top20']:.2f} | {r['spearman_above_floor']:.3f} "
              f"({r['n_above_floor']}/{r['n_heads']}) | {r['max_abs_diff']:.4f} | {r['seconds_f32']:.2f} | "
              f"{r['seconds_bf16']:.2f} | {r['ratio']:.2f} |")
    print(f"\nDLA: largest miss of the terms' sum / tolerance: float32 {miss[torch.float32]:.3g}, "
          f"bf16 {miss[torch.bfloat16]:.3g}")
    write_result(ap_args.out, {"machine": machine_info(), "n": ap_args.n, "reps": ap_args.reps, "floor": FLOOR,
                               "rows": rows, "dla_miss_over_tolerance": {str(k): v for k, v in miss.items()}})


FLOOR = 0.01  # |score| below which float32 ranks are compared with rounding noise

if __name__ == "__main__":
    main()
