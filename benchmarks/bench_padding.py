"""Cost of AtP, DLA and AttnLRP on a mixed-length (right-padded) batch, in forward passes.

The batch: ``--n`` prompts, short capital-city facts and IOI sentences, each behind a
shared filler repeated a different number of times, so the prompts span about 8 to 32 tokens (``build_dataset(..., same_length=False)``:
right-padded to the longest). After a warm-up, ``--reps`` wall times of each case
(``time.perf_counter``, cases interleaved per repetition), divided by one plain forward of
the same padded batch (``plain_forward_seconds``, in the same round-robin).
``forward_equivalents`` divides the fastest repetition by the fastest plain forward;
``forward_equivalents_median`` the medians. Targets (issue 11): AtP <= 4, DLA <= 1.5,
AttnLRP <= 4. Cases:

- ``atp_all``: ``attribution_patching_all`` at resid_pre, attn_out, mlp_out and z;
- ``dla_all``: ``direct_logit_attribution_all`` at z, attn_out and mlp_out;
- ``attnlrp``: ``attnlrp`` with every readout (input, sites, heads).

Each method reads every prompt at its own last token and puts per-position results on the
dataset's position axis (named positions here), so this is the cost of that bookkeeping
on top of the methods' passes.

    python benchmarks/bench_padding.py [--model tiny|smollm2] [--n 8] [--reps 3]
"""

from __future__ import annotations

import statistics
import time

from _common import load, machine_info, parse_args, write_result
from bench_atp_dla import time_cases

from mechsteer.attribution import attribution_patching_all, attnlrp, direct_logit_attribution_all
from mechsteer.runs import plain_forward_seconds
from mechsteer.tasks.base import Candidate, build_dataset
from mechsteer.tasks.ioi import ioi_candidates

FILLER = "Please complete this sentence. "
CAPITALS = [("France", " Paris"), ("Italy", " Rome"), ("Germany", " Berlin"), ("Spain", " Madrid"),
            ("Japan", " Tokyo"), ("Russia", " Moscow")]


def mixed_dataset(model, n: int):
    """``n`` prompts of about 8..32 tokens: short capital-city facts and IOI sentences, each
    behind 0..4 copies of a short filler (a different count per prompt)."""
    short = [Candidate(f"The capital of {a} is", f"The capital of {b} is", ca, cb)
             for (a, ca), (b, cb) in zip(CAPITALS, CAPITALS[1:] + CAPITALS[:1])]
    ioi = ioi_candidates(0, n_per_template=1)
    base = [c for pair in zip(short, ioi) for c in pair]  # alternate short and long items
    cands = []
    for i, c in enumerate(base):
        pre = FILLER * ((i // 2) % 4 + (1 - i % 2))  # short items: 1..4 copies, IOI: 0..3
        cands.append(Candidate(pre + c.prompt, pre + c.corrupted, c.correct, c.wrong, dict(c.meta)))
    return build_dataset("mixed", model, cands, n=n, seed=0, min_items=2, same_length=False)


def main() -> None:
    args = parse_args(__doc__, "padding", n=8, reps=3)
    model = load(args.model)
    ds = mixed_dataset(model, args.n)
    cases = {"plain": lambda: plain_forward_seconds(model, ds.tokens, repeats=1)}
    cases["atp_all"] = lambda: attribution_patching_all(model, ds, sites=("resid_pre", "attn_out", "mlp_out", "z"))
    cases["dla_all"] = lambda: direct_logit_attribution_all(model, ds)
    cases["attnlrp"] = lambda: attnlrp(model, ds, progress=False)
    times = time_cases(cases, args.reps)
    plain, plain_median = min(times["plain"]), statistics.median(times["plain"])
    targets = {"atp_all": 4.0, "dla_all": 1.5, "attnlrp": 4.0}
    rows = {
        name: {"min_s": min(t), "median_s": statistics.median(t), "times_s": t, "target": targets[name]}
        for name, t in times.items() if name != "plain"
    }
    for r in rows.values():
        r["forward_equivalents"] = r["min_s"] / plain
        r["forward_equivalents_median"] = r["median_s"] / plain_median
        r["meets_target"] = r["forward_equivalents"] <= r["target"]

    print(f"model={model.cfg.model_name} tokens={tuple(ds.tokens.shape)} lengths={ds.lengths.tolist()} "
          f"axis={ds.position_axis().mode} reps={args.reps} plain={plain * 1e3:.1f} ms (median {plain_median * 1e3:.1f} ms)")
    print(f"{'case':<10}{'min ms':>9}{'fwd-equiv':>11}{'median ms':>11}{'(median)':>10}{'target':>8}")
    for name, r in rows.items():
        print(f"{name:<10}{r['min_s'] * 1e3:>9.1f}{r['forward_equivalents']:>11.2f}"
              f"{r['median_s'] * 1e3:>11.1f}{r['forward_equivalents_median']:>10.2f}{r['target']:>8.1f}")
    write_result(args.out, {
        "benchmark": "padding",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model.cfg.model_name,
        "tokens_shape": list(ds.tokens.shape),
        "lengths": ds.lengths.tolist(),
        "position_axis": ds.position_axis().mode,
        "reps": args.reps,
        "plain_forward_s": plain,
        "plain_forward_median_s": plain_median,
        "plain_forward_times_s": times["plain"],
        "machine": machine_info(),
        "results": rows,
    })


if __name__ == "__main__":
    main()
