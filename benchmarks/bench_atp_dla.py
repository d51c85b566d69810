"""Cost of attribution patching (AtP) and direct logit attribution (DLA), in forward passes.

On an IOI batch (``mechsteer.tasks.ioi(model, n=--n)``), after a warm-up, ``--reps``
wall times (``time.perf_counter``, the cases interleaved in each repetition) of each case,
divided by the time of one plain forward of the same batch (``plain_forward_seconds``,
called in the same round-robin). ``forward_equivalents`` divides the fastest repetition
by the fastest plain forward (on a shared machine other jobs only ever add time, so the
minimum is the estimate least disturbed by them); ``forward_equivalents_median`` divides
the medians. Cases:

- ``atp_all``: ``attribution_patching_all`` for resid_pre, attn_out, mlp_out and z
  (one forward+backward on the clean prompts, one forward on the corrupted ones);
- ``atp_<site>``: ``attribution_patching`` for one site;
- ``dla_<site>``: ``direct_logit_attribution`` for z, attn_out and mlp_out;
- ``dla_terms``: the full term table (a pandas DataFrame);
- ``dla_pos_vectors``: ``dla_per_position`` (attn_out + mlp_out at every position, paper
  003 Fig. 9); ``dla_pos_sources_z``: per head and source position (``mode="sources"``).

``identities`` reports, per prompt, the largest miss of dla_per_position's identities:
sources summed over positions vs ``direct_logit_attribution(site="z")`` and the vectors'
last column vs the same (logits).

    python benchmarks/bench_atp_dla.py [--model tiny|smollm2] [--n 16] [--reps 3]
"""

from __future__ import annotations

import statistics
import time


from _common import load, machine_info, parse_args, write_result

from mechsteer.attribution import (
    attribution_patching,
    attribution_patching_all,
    direct_logit_attribution,
    dla_per_position,
    dla_terms,
)
from mechsteer.runs import plain_forward_seconds
from mechsteer.tasks import ioi

SITES = ("resid_pre", "attn_out", "mlp_out", "z")


def time_cases(cases: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Warm up each case, then time them round-robin (so drift hits all cases alike).
    A case that returns a float reports its own time (``plain_forward_seconds``)."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            t = time.perf_counter()
            own = fn()
            times[name].append(own if isinstance(own, float) else time.perf_counter() - t)
    return times


def main() -> None:
    args = parse_args(__doc__, "atp_dla", n=16, reps=3)
    model = load(args.model)
    ds = ioi(model, n=args.n)

    cases = {"plain": lambda: plain_forward_seconds(model, ds.tokens, repeats=1)}
    cases["atp_all"] = lambda: attribution_patching_all(model, ds, sites=SITES)
    for site in SITES:
        cases[f"atp_{site}"] = lambda site=site: attribution_patching(model, ds, site=site)
    for site in ("z", "attn_out", "mlp_out"):
        cases[f"dla_{site}"] = lambda site=site: direct_logit_attribution(model, ds, site=site)
    cases["dla_terms"] = lambda: dla_terms(model, ds)
    cases["dla_pos_vectors"] = lambda: dla_per_position(model, ds)
    cases["dla_pos_sources_z"] = lambda: dla_per_position(model, ds, site="z", mode="sources")
    times = time_cases(cases, args.reps)
    plain, plain_median = min(times["plain"]), statistics.median(times["plain"])  # one no-grad forward
    rows = {
        name: {"min_s": min(t), "median_s": statistics.median(t), "times_s": t}
        for name, t in times.items()
        if name != "plain"
    }
    for r in rows.values():
        r["forward_equivalents"] = r["min_s"] / plain
        r["forward_equivalents_median"] = r["median_s"] / plain_median

    print(f"model={model.cfg.model_name} tokens={tuple(ds.tokens.shape)} reps={args.reps} "
          f"plain={plain * 1e3:.1f} ms (median {plain_median * 1e3:.1f} ms)")
    print(f"{'case':<18}{'min ms':>9}{'fwd-equiv':>11}{'median ms':>11}{'(median)':>10}")
    for name, r in rows.items():
        print(f"{name:<18}{r['min_s'] * 1e3:>9.1f}{r['forward_equivalents']:>11.2f}"
              f"{r['median_s'] * 1e3:>11.1f}{r['forward_equivalents_median']:>10.2f}")

    z = direct_logit_attribution(model, ds, site="z", per_prompt=True).per_prompt
    src = dla_per_position(model, ds, site="z", mode="sources", per_prompt=True).per_prompt
    vec = dla_per_position(model, ds, site="z", per_prompt=True).per_prompt
    identities = {"sources_sum_vs_dla_z": (src.sum(-1) - z).abs().max().item(),
                  "vectors_last_vs_dla_z": (vec[..., -1] - z).abs().max().item(),
                  "max_abs_dla_z": z.abs().max().item()}
    print("identities (max abs miss, logits):", {k: f"{v:.3g}" for k, v in identities.items()})

    result = {
        "benchmark": "atp_dla",
        "identities": identities,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model.cfg.model_name,
        "tokens_shape": list(ds.tokens.shape),
        "reps": args.reps,
        "plain_forward_s": plain,
        "plain_forward_median_s": plain_median,
        "plain_forward_times_s": times["plain"],
        "machine": machine_info(),
        "results": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
