"""Overhead of hooked forward passes, as ratios to a plain forward pass.

On an IOI batch (``mechsteer.tasks.ioi(model, n=32).tokens``), under ``torch.no_grad``
after a warm-up, the median of ``--reps`` timings (``time.perf_counter``, the three
cases interleaved in each repetition) of:

- plain: ``model(tokens)``;
- identity: inside ``mechsteer.sites.hooked`` with ``lambda x, hook: x`` on every layer's
  ``attn_out`` and ``mlp_out``;
- cache: the same hooks, each storing ``x.detach()`` in a dict.

Wall time is the figure. CPU time (``process_time``, all threads) is recorded too: about
threads x wall when the cores are free, and inflated (spinning threads) when they are not,
so it shows whether other processes disturbed a run.

    python benchmarks/bench_hooks.py [--model tiny] [--out benchmarks/results/hooks.json]
"""

from __future__ import annotations

import statistics
import time

import torch

from _common import load, machine_info, parse_args, write_result

from mechsteer.sites import hook_name, hooked
from mechsteer.tasks import ioi


def time_cases(cases: dict, reps: int, warmup: int = 2) -> dict[str, dict[str, list[float]]]:
    """Warm up each case, then time them round-robin (so drift hits all cases alike).

    Records wall time (``perf_counter``) and this process's CPU time (``process_time``,
    all threads).
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times = {name: {"wall": [], "cpu": []} for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            times[name]["wall"].append(time.perf_counter() - t)
            times[name]["cpu"].append(time.process_time() - c)
    return times


def main() -> None:
    args = parse_args(__doc__, "hooks", n=32, reps=5)
    model = load(args.model)
    tokens = ioi(model, n=args.n).tokens
    names = [hook_name(s, l) for l in range(model.cfg.n_layers) for s in ("attn_out", "mlp_out")]
    cache: dict[str, torch.Tensor] = {}

    def store(name):
        def fn(x, hook):
            cache[name] = x.detach()  # close over the registered name, not hook.name

        return fn

    identity = [(n, lambda x, hook: x) for n in names]
    caching = [(n, store(n)) for n in names]

    def plain():
        model(tokens)

    def with_hooks(hooks):
        def fn():
            with hooked(model, hooks):
                model(tokens)

        return fn

    cases = {"plain": plain, "identity": with_hooks(identity), "cache": with_hooks(caching)}
    with torch.no_grad():
        times = time_cases(cases, args.reps)
    rows = {
        name: {"median_s": statistics.median(t["wall"]), "median_cpu_s": statistics.median(t["cpu"]),
               "times_s": t["wall"], "cpu_times_s": t["cpu"]}
        for name, t in times.items()
    }
    assert len(cache) == len(names), "caching hooks did not all fire"
    for r in rows.values():
        r["ratio_to_plain"] = r["median_s"] / rows["plain"]["median_s"]
        r["cpu_ratio_to_plain"] = r["median_cpu_s"] / rows["plain"]["median_cpu_s"]

    print(f"model={model.cfg.model_name} tokens={tuple(tokens.shape)} hooks={len(names)} reps={args.reps}")
    print(f"{'case':<10}{'wall ms':>10}{'ratio':>8}{'cpu ms':>10}{'cpu ratio':>11}")
    for name, r in rows.items():
        print(f"{name:<10}{r['median_s'] * 1e3:>10.1f}{r['ratio_to_plain']:>8.3f}"
              f"{r['median_cpu_s'] * 1e3:>10.1f}{r['cpu_ratio_to_plain']:>11.3f}")

    result = {
        "benchmark": "hooks",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model.cfg.model_name,
        "tokens_shape": list(tokens.shape),
        "n_hooks": len(names),
        "reps": args.reps,
        "machine": machine_info(),
        "results": rows,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
