"""AttnLRP cost in forward-equivalents, throughput, and conservation ratios.

On an IOI batch (``mechsteer.tasks.ioi(model, n=N)``), one ``attnlrp`` call with every
readout (input tokens; resid_pre / attn_out / mlp_out / resid_post at every layer and
position; head relevance on the attention weights from the last position), all from one
forward + one backward pass, timed as the median of ``--reps`` interleaved runs of:

- ``attnlrp``: the AttnLRP rules (``variant="attnlrp"``);
- ``cp``: CP-LRP (constant attention weights);
- ``cp-lxt``: lxt's CP-LRP (also a constant gate on gated MLPs);
- ``grad_x_input``: the same readouts with every rule off (``rules=False``);

each divided by one plain no-grad forward of the same batch timed just before it
(``plain_forward_seconds``): the median of these paired ratios is the
cost in forward-equivalents. Pairing keeps the ratio steadier when the load of a shared
machine drifts; the same ratios in process CPU time (``time.process_time``, this process's
threads only) are reported beside them, as they are less disturbed by other processes.
Throughput: samples per minute from the median wall time. Conservation: sum of the
input-token relevances over the explained logit difference (aggregate over prompts, and
the median per prompt), and the same for the raw correct-answer logit. ``cp_vs_cp_lxt``:
how far the two CP-LRP forms disagree (both conserve f): Spearman correlation of the
per-prompt input relevances (median over prompts) and of the head relevances (mean over
prompts), and the largest absolute differences.

    python benchmarks/bench_lrp.py [--model tiny] [--n 16] [--reps 3]
"""

from __future__ import annotations

import statistics
import time

import torch

from _common import load, machine_info, parse_args, write_result

from mechsteer.attribution import attnlrp
from mechsteer.runs import plain_forward_seconds
from mechsteer.tasks import ioi

CASES = {"attnlrp": dict(variant="attnlrp"), "cp": dict(variant="cp"), "cp-lxt": dict(variant="cp-lxt"),
         "grad_x_input": dict(rules=False)}


def spearman(a, b) -> float:
    """Rank correlation (ties broken by order; the relevances here are continuous)."""
    ra, rb = (x.flatten().double().argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def cp_vs_cp_lxt(a, b, lengths) -> dict[str, float]:
    """Agreement of two attnlrp results (dicts of readouts, per_prompt kept)."""
    ia, ib = a["input"].per_prompt, b["input"].per_prompt
    rhos = torch.tensor([spearman(ia[i, : int(n)], ib[i, : int(n)]) for i, n in enumerate(lengths)])
    return {"input_spearman_median": rhos.median().item(), "input_max_abs_diff": (ia - ib).abs().max().item(),
            "input_max_abs": ia.abs().max().item(),
            "heads_spearman": spearman(a["heads"].scores, b["heads"].scores),
            "heads_max_abs_diff": (a["heads"].scores - b["heads"].scores).abs().max().item(),
            "heads_max_abs": a["heads"].scores.abs().max().item()}


def conservation(out) -> dict[str, float]:
    """sum(R_input) / f: aggregate over prompts, and the median of the per-prompt ratios."""
    r, f = out.per_prompt.sum(-1), out.meta["target"]
    return {"aggregate": (r.sum() / f.sum()).item(), "median_per_prompt": (r / f).median().item()}


def main() -> None:
    args = parse_args(__doc__, "lrp", n=16, reps=3)
    model = load(args.model)
    ds = ioi(model, n=args.n)
    kw = dict(readout=("input", "sites", "heads"), batch_size=args.n, progress=False, per_prompt=True)
    outs = {name: attnlrp(model, ds, **kw, **case) for name, case in CASES.items()}  # warm-up
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = {name: {c: [] for c in clocks} for name in CASES}
    ratios = {name: {c: [] for c in clocks} for name in CASES}
    plain = {c: [] for c in clocks}

    def timed(fn) -> dict[str, float]:
        start = {c: clock() for c, clock in clocks.items()}
        fn()
        return {c: clock() - start[c] for c, clock in clocks.items()}

    def forward():
        with torch.no_grad():
            model(ds.tokens)

    for _ in range(args.reps):  # interleaved; each case paired with a plain forward just before it
        for name, case in CASES.items():
            p = {"wall": plain_forward_seconds(model, ds.tokens, repeats=1), "cpu": timed(forward)["cpu"]}
            t = timed(lambda: outs.__setitem__(name, attnlrp(model, ds, **kw, **case)))
            for c in clocks:
                plain[c].append(p[c])
                times[name][c].append(t[c])
                ratios[name][c].append(t[c] / p[c])
    rows = {}
    for name in CASES:
        med = statistics.median(times[name]["wall"])
        rows[name] = {"median_s": med, "times_s": times[name], "ratios": ratios[name],
                      "forward_equivalents": statistics.median(ratios[name]["wall"]),
                      "forward_equivalents_cpu": statistics.median(ratios[name]["cpu"]),
                      "samples_per_minute": args.n / med * 60,
                      "conservation_logit_diff": conservation(outs[name]["input"])}
    plain_s = statistics.median(plain["wall"])
    for name, case in (("attnlrp", {}), ("cp", dict(variant="cp")), ("cp-lxt", dict(variant="cp-lxt"))):
        logit = attnlrp(model, ds.tokens, answer=ds.correct, readout="input", per_prompt=True, progress=False, **case)
        rows[name]["conservation_logit"] = conservation(logit)

    print(f"model={model.cfg.model_name} tokens={tuple(ds.tokens.shape)} reps={args.reps} "
          f"plain forward {plain_s * 1e3:.1f} ms, torch threads {torch.get_num_threads()}")
    head = ("case", "median ms", "fwd-eq", "(cpu)", "samples/min", "R/f (ld)", "R/f (logit)")
    widths = (14, 10, 8, 7, 13, 10, 12)
    print("".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(head, widths))))
    for name, r in rows.items():
        logit = r.get("conservation_logit", {}).get("aggregate", float("nan"))
        cells = (r["median_s"] * 1e3, r["forward_equivalents"], r["forward_equivalents_cpu"], r["samples_per_minute"],
                 r["conservation_logit_diff"]["aggregate"], logit)
        fmts = (".1f", ".2f", ".2f", ".0f", ".3f", ".3f")
        print(f"{name:<14}" + "".join(f"{c:>{w}{f}}" for c, w, f in zip(cells, widths[1:], fmts)))

    agree = cp_vs_cp_lxt(outs["cp"], outs["cp-lxt"], ds.lengths)
    print("cp vs cp-lxt:", {k: round(v, 4) for k, v in agree.items()})

    result = {
        "benchmark": "lrp",
        "cp_vs_cp_lxt": agree,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model.cfg.model_name,
        "tokens_shape": list(ds.tokens.shape),
        "readouts": list(kw["readout"]),
        "reps": args.reps,
        "plain_forward_s": plain_s,
        "machine": machine_info(device=str(model.cfg.device)),
        "results": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
