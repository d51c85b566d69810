"""Fast paths of issue 9, each against its plain path in one run: patching with nearby start
positions grouped (FORWARD_COST_ROWS) vs one run per start, and top-k predictions with a
shared prompt prefix computed once vs a plain forward.

    .venv/bin/python benchmarks/bench_fast_paths.py            # SmolLM2, 4 CCC prompts
    .venv/bin/python benchmarks/bench_fast_paths.py --model tiny
"""

from __future__ import annotations

import time

import torch

from _common import load, machine_info, parse_args, write_result
import mechsteer.attribution._patch_engine as engine
from mechsteer.attribution import activation_patching
from mechsteer.tasks import make_task
from mechsteer.tasks.fv import fv_prompts, top_k_predictions


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    args = parse_args(__doc__, "fast_paths", n=4, reps=2)
    model = load(args.model)
    ds = make_task("ccc", model, n=32, seed=0).subset(slice(0, args.n))
    rows, grouped = [], engine.FORWARD_COST_ROWS
    for _ in range(args.reps):  # interleaved, so both cases see the same machine load
        for cost in (0, grouped):
            engine.FORWARD_COST_ROWS = cost
            s, r = _timed(lambda: activation_patching(model, ds, site=["attn_out", "mlp_out"], direction="noising",
                                                      progress=False))
            rows.append({"case": f"patching FORWARD_COST_ROWS={cost}", "seconds": s, "forwards": r.meta["forwards"],
                         "scores": r.scores})
    engine.FORWARD_COST_ROWS = grouped
    ref = rows[0]["scores"]
    prompts = fv_prompts(model, "antonym", style="chat" if model.tokenizer.chat_template else "instruction", n=20)
    for _ in range(args.reps):
        for share in (False, True):
            s, top = _timed(lambda: top_k_predictions(model, prompts, 3, progress=False, share_prefix=share))
            rows.append({"case": f"top-3 share_prefix={share}", "seconds": s, "top": top})
    for r in rows:
        extra = f", {r['forwards']} forwards, max diff {float((r['scores'] - ref).abs().max()):.1e}" if "scores" in r else ""
        extra += f", same top-3 as plain: {bool(torch.equal(r['top'], rows[-2]['top']))}" if "top" in r else ""
        print(f"{r['case']}: {r['seconds']:.1f} s{extra}")
    write_result(args.out, {"machine": machine_info(model=args.model, n=args.n), "cases": [
        {k: v for k, v in r.items() if k not in ("scores", "top")} for r in rows]})


if __name__ == "__main__":
    main()
