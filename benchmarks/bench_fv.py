"""Function-vector head scores: samples per minute of naive AIE, fast AIE, AttnLRP and AtP.

Paper 000 (Table 1) times head selection in samples per minute: AIE (one forward per head
per sample) against AttnLRP (one forward + one backward per sample). Here, on the same
prompts, all four ways mechsteer scores every head of the model:

- ``aie_naive``: ``aie(mode="naive")``, the paper's procedure (n_layers x n_heads full
  forwards per prompt group, 270 on SmolLM2);
- ``aie_fast``: ``aie(mode="fast")``, the same numbers from batched one-token runs;
- ``lrp``: ``lrp_head_scores`` (AttnLRP relevance of attention from the last token to the
  intensional frame);
- ``atp``: ``atp_head_scores`` (first-order estimate of AIE, one forward + backward).

Prompts: ``fv_prompts(model, --task)`` (instruction style, every instruction), kept where the
answer ranks in the model's top 5 (the LRP rule, so LRP uses every prompt); task means
``mean_head_z`` from all kept prompts. The timed sample is ``--n`` kept prompts of one token
length (one group, batch = n, for every method); corrupted prompts: ``corrupt``. Naive AIE
runs once (it is slow); the others run ``--reps`` times (median) after a one-prompt
warm-up. Also reported: fast AIE, LRP and AtP on ``--n-large`` kept prompts (groups of up
to 32 prompts of one length),
the largest difference between naive and fast AIE, and Spearman correlations between
the methods' head scores. A sample = one prompt scored over all heads.

    OMP_NUM_THREADS=1 python benchmarks/bench_fv.py [--model tiny] [--task antonym] [--n 4] [--n-large 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch

from _common import load, machine_info, write_result

from mechsteer.fv.means import mean_head_z
from mechsteer.fv.scores import aie, atp_head_scores, lrp_head_scores, rank_correlation
from mechsteer.tasks.fv import corrupt, fv_prompts, top_k_predictions


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2",
                    help="embedded SmolLM2-135M (default) or the tiny random llama for a quick check")
    ap.add_argument("--task", default="antonym", help="function-vector task (mechsteer/tasks/fv_data)")
    ap.add_argument("--n", type=int, default=4, help="prompts in the timed sample (naive AIE costs 270 forwards per group)")
    ap.add_argument("--n-large", type=int, default=64, help="kept prompts for the larger-group throughput run")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of fast AIE, LRP and AtP (median reported)")
    ap.add_argument("--out", default="benchmarks/results/fv.json", help="JSON results path")
    return ap.parse_args()


def main() -> None:
    args = parse()
    model = load(args.model)
    prompts = fv_prompts(model, args.task, style="instruction")
    top5 = top_k_predictions(model, prompts, 5, progress=False)
    kept = prompts.subset([i for i in range(len(prompts)) if prompts.answers[i] in top5[i]])
    max_rank = 5
    if args.model == "tiny":  # a random model ranks no answer in its top 5: use every prompt
        kept, max_rank = prompts, model.cfg.d_vocab
    start = time.perf_counter()
    mean_z = mean_head_z(model, kept, progress=False)
    mean_z_s = time.perf_counter() - start
    length = Counter(kept.lengths.tolist()).most_common(1)[0][0]  # the largest equal-length group
    same = [i for i in range(len(kept)) if kept.lengths[i] == length][: args.n]
    clean = kept.subset(same)
    corr = corrupt(model, clean)
    cases = {
        "aie_fast": lambda c, p, **kw: aie(model, c, mean_z, mode="fast", batch_size=len(p), progress=False, **kw),
        "lrp": lambda c, p, **kw: lrp_head_scores(model, p, max_rank=max_rank, batch_size=len(p), progress=False, **kw),
        "atp": lambda c, p, **kw: atp_head_scores(model, c, mean_z, batch_size=len(p), progress=False, **kw),
    }
    for fn in cases.values():  # warm-up on one prompt
        fn(corr.subset([0]), clean.subset([0]))
    naive = aie(model, corr, mean_z, mode="naive", batch_size=len(clean), per_prompt=True, progress=True)
    runs = {name: [fn(corr, clean) for _ in range(args.reps)] for name, fn in cases.items()}
    results = {"aie_naive": naive, **{name: r[-1] for name, r in runs.items()}}
    seconds = {"aie_naive": naive.seconds, **{name: statistics.median(x.seconds for x in r) for name, r in runs.items()}}
    spm = {name: 60.0 * len(clean) / s for name, s in seconds.items()}
    fast_pp = aie(model, corr, mean_z, mode="fast", per_prompt=True, progress=False).per_prompt
    max_diff = (fast_pp - naive.per_prompt).abs().max().item()

    many = kept.subset(range(min(args.n_large, len(kept))))  # throughput with larger groups (up to 32)
    corr_all = corrupt(model, many)
    large = {"aie_fast": aie(model, corr_all, mean_z, progress=False),
             "lrp": lrp_head_scores(model, many, max_rank=max_rank, progress=False),
             "atp": atp_head_scores(model, corr_all, mean_z, progress=False)}
    names = list(results)
    spearman = {f"{a}~{b}": rank_correlation(results[a], results[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    spearman_all = {f"{a}~{b}": rank_correlation(large[a], large[b]) for i, a in enumerate(large) for b in list(large)[i + 1:]}

    cfg = model.cfg
    print(f"model={cfg.model_name} ({cfg.n_layers} layers x {cfg.n_heads} heads) task={args.task} "
          f"kept {len(kept)}/{len(prompts)} prompts (answer in top 5); sample: {len(clean)} prompts of {length} tokens; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'case':<11}{'seconds':>10}{'samples/min':>14}{'x naive':>10}{'n-large: samples/min':>24}")
    for name in names:
        big = f"{large[name].meta['samples_per_minute']:.1f}" if name in large else "-"
        print(f"{name:<11}{seconds[name]:>10.2f}{spm[name]:>14.2f}{spm[name] / spm['aie_naive']:>10.1f}{big:>24}")
    print(f"max |fast - naive| CIE: {max_diff:.2e}; mean_head_z of {len(kept)} prompts: {mean_z_s:.2f} s")
    print("Spearman (sample):", {k: round(v, 3) for k, v in spearman.items()})
    print(f"Spearman ({len(many)} prompts):", {k: round(v, 3) for k, v in spearman_all.items()})

    result = {
        "benchmark": "fv",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": cfg.model_name,
        "task": args.task,
        "n_prompts": len(prompts),
        "n_kept": len(kept),
        "sample": {"n": len(clean), "n_pos": length},
        "reps": args.reps,
        "seconds": seconds,
        "times_s": {"aie_naive": [naive.seconds], **{n: [x.seconds for x in r] for n, r in runs.items()}},
        "samples_per_minute": spm,
        "ratios": {"fast/naive": spm["aie_fast"] / spm["aie_naive"], "lrp/naive": spm["lrp"] / spm["aie_naive"],
                   "atp/naive": spm["atp"] / spm["aie_naive"], "lrp/fast": spm["lrp"] / spm["aie_fast"]},
        "lrp_used": {"sample": results["lrp"].meta["n_used"], "large": large["lrp"].meta["n_used"]},
        "n_large": len(many),
        "large_samples_per_minute": {n: r.meta["samples_per_minute"] for n, r in large.items()},
        "max_abs_diff_fast_naive": max_diff,
        "mean_head_z_s": mean_z_s,
        "spearman_sample": spearman,
        "spearman_large": spearman_all,
        "fast_rows_per_forward": results["aie_fast"].meta["rows_per_forward"],
        "machine": machine_info(device=str(cfg.device)),
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
