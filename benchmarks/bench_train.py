"""Cost of training a learnable intervention (seed paper 003): one epoch in forward passes,
and the wall time of the App. A.1 default of 25 epochs.

On ``--n`` CCC prompts (``mechsteer.tasks.ccc``), for ActivScalar, SteerVec and DynScalar
on attn_out + mlp_out at every layer and position:

- ``epoch_forward_equivalents``: the fastest of ``--reps`` one-epoch trainings (batch size
  32, so one step per 32 prompts; each step is one forward + backward of the batch at
  beta = +1 and -1 stacked, i.e. 2x the prompts) divided by the fastest plain no-grad
  forward of the same ``--n`` prompts, timed round-robin in the same run. The issue's
  target is at most 6. The clean logits f are computed once per ``train`` call and are
  part of the timed epoch (one more forward), so this is an upper bound per epoch.
- ``epochs25_s``: wall time of one ``train`` call with the default 25 epochs.

    python benchmarks/bench_train.py [--model tiny|smollm2] [--n 32] [--reps 3]
"""

from __future__ import annotations

import time

from _common import load, machine_info, parse_args, write_result

from mechsteer.interventions import TrainConfig, train
from mechsteer.interventions.kinds import KINDS
from mechsteer.runs import plain_forward_seconds
from mechsteer.tasks import ccc

SITES = ("attn_out", "mlp_out")


def one_train(model, ds, kind: str, epochs: int) -> float:
    iv = KINDS[kind].for_model(model, sites=SITES, n_pos=ds.n_pos)
    t = time.perf_counter()
    train(model, iv, ds, TrainConfig(epochs=epochs, progress=False))
    return time.perf_counter() - t


def main() -> None:
    args = parse_args(__doc__, "train", n=32, reps=3)
    model = load(args.model)
    ds = ccc(model, n=args.n)
    one_train(model, ds, "activ_scalar", 1)  # warm-up
    plain, epoch = [], {k: [] for k in KINDS}
    for _ in range(args.reps):  # round-robin, so drift hits all cases alike
        plain.append(plain_forward_seconds(model, ds.tokens, repeats=1))
        for kind in KINDS:
            epoch[kind].append(one_train(model, ds, kind, 1))
    base = min(plain)
    rows = {}
    for kind in KINDS:
        rows[kind] = {
            "epoch_min_s": min(epoch[kind]),
            "epoch_forward_equivalents": min(epoch[kind]) / base,
            "epochs25_s": one_train(model, ds, kind, 25),
            "n_params": KINDS[kind].for_model(model, sites=SITES, n_pos=ds.n_pos).n_params,
        }
    print(f"model={model.cfg.model_name} prompts={tuple(ds.tokens.shape)} plain forward={base * 1e3:.1f} ms")
    print(f"{'method':<14}{'n_params':>10}{'epoch ms':>10}{'fwd-equiv':>11}{'25 epochs s':>13}")
    for kind, r in rows.items():
        print(f"{kind:<14}{r['n_params']:>10}{r['epoch_min_s'] * 1e3:>10.0f}"
              f"{r['epoch_forward_equivalents']:>11.2f}{r['epochs25_s']:>13.1f}")
    write_result(args.out, {
        "model": model.cfg.model_name, "n_prompts": len(ds), "n_pos": ds.n_pos, "sites": list(SITES),
        "plain_forward_s": base, "methods": rows, "machine": machine_info(reps=args.reps),
    })


if __name__ == "__main__":
    main()
