"""Padding changes nothing: interventions, training, evaluation, transfer, generation and
FV injection on right-padded datasets of mixed prompt lengths (issue 11 item 5).

Each prompt's result in a mixed-length batch equals the result of the dataset holding
that prompt alone (``ds.subset([i])``, rel 1e-4), on tiny gpt2 (learned position
embeddings) and llama (rotary).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mechsteer.fv.inject import inject_dfv, inject_fv
from mechsteer.interventions import ActivScalar, DynScalar, SteerVec, TrainConfig, evaluate, train
from mechsteer.interventions.generate import steered_generate
from mechsteer.interventions.objective import answer_logits, plus_minus_logits
from mechsteer.interventions.train import dataset_tensors
from mechsteer.interventions.transfer import transfer_matrix
from mechsteer.metrics import logit_diff
from mechsteer.tasks.base import build_dataset
from mechsteer.tasks.ccc import ccc_candidates
from mechsteer.tasks.ioi import ioi_candidates

REL = 1e-4


def mixed(model):
    cands = ccc_candidates(0, templates=[0, 1])[:6] + ioi_candidates(0, n_per_template=2)
    ds = build_dataset("mix", model, cands, n=None, seed=0, same_length=False)
    assert ds.is_padded and len(set(ds.lengths.tolist())) > 2
    return ds


def per_prompt(model, iv, ds):
    """(logit diff at beta = +1, at beta = -1) per prompt, bound as training binds them."""
    tokens, correct, wrong, pos, where = dataset_tensors(model, iv, ds)
    with torch.no_grad():
        plus, minus = plus_minus_logits(model, iv, tokens, pos=pos, where=where)
    return torch.stack([logit_diff(plus, correct, wrong, reduce="none"), logit_diff(minus, correct, wrong, reduce="none")])


def assert_alone(model, iv, ds):
    together = per_prompt(model, iv, ds)
    alone = torch.cat([per_prompt(model, iv, ds.subset([i])) for i in range(len(ds))], dim=1)
    torch.testing.assert_close(together, alone, rtol=REL, atol=REL * together.abs().max().item())
    return together


def build(kind, model, ds, **kw):
    return kind.for_dataset(model, ds, sites=["attn_out", "mlp_out"], **kw)


@pytest.mark.parametrize("kind", [ActivScalar, SteerVec, DynScalar])
def test_zero_intervention_leaves_padded_logits_unchanged(tiny, kind):
    ds = mixed(tiny)
    iv = build(kind, tiny, ds, init_std=0.0)
    where = iv.token_index(ds)
    with torch.no_grad():
        clean = tiny(ds.tokens)
        with iv.apply(tiny, beta=1.0, where=where):
            steered = tiny(ds.tokens)
    assert torch.equal(steered[ds.mask], clean[ds.mask])


@pytest.mark.parametrize("kind", [ActivScalar, SteerVec, DynScalar])
@pytest.mark.parametrize("axis", ["end", "auto"])
def test_fixed_intervention_per_prompt_equals_alone(tiny, kind, axis):
    ds = mixed(tiny)
    iv = build(kind, tiny, ds, init_std=0.3, seed=1, axis=axis)
    if kind is not DynScalar:
        assert iv.slots == tuple(ds.position_axis(axis).labels) and iv.slots[-1] == "end"
    together = assert_alone(tiny, iv, ds)
    assert (together[0] != together[1]).any()  # the intervention does something


@pytest.mark.parametrize("kind", [SteerVec, DynScalar])
def test_last_position_is_each_prompts_own(tiny_gpt2, kind):
    ds = mixed(tiny_gpt2)
    iv = kind.for_dataset(tiny_gpt2, ds, sites=["resid_post"], positions="last", init_std=0.3)
    assert iv.token_index(ds)[:, 0].tolist() == ds.last.tolist()
    assert_alone(tiny_gpt2, iv, ds)


def test_named_slots_per_prompt_equals_alone(tiny_llama):
    ds = mixed(tiny_llama)  # hand-made named positions, some absent in some prompts
    names = [{"second": 1, "third": 2} if i % 2 else {"second": 1} for i in range(len(ds))]
    ds = dataclasses.replace(ds, positions=names)
    iv = build(ActivScalar, tiny_llama, ds, init_std=0.3, seed=2)
    assert iv.slots == ("second", "third", "end")
    assert iv.token_index(ds)[0].tolist() == [1, -1, int(ds.last[0])]
    assert_alone(tiny_llama, iv, ds)
    with pytest.raises(ValueError, match="bind"):
        iv(tiny_llama, ds.tokens)  # named slots need each prompt's indices


def test_end_slots_run_unbound_on_a_single_prompt(tiny_gpt2):
    ds = mixed(tiny_gpt2)
    iv = build(SteerVec, tiny_gpt2, ds, init_std=0.3, axis="end")
    one = ds.subset([1])
    with torch.no_grad():
        with iv.apply(tiny_gpt2, 1.0, where=iv.token_index(one)):
            bound = tiny_gpt2(one.tokens)
        inferred = iv(tiny_gpt2, one.tokens)
    torch.testing.assert_close(bound, inferred)


def test_evaluate_on_mixed_equals_mean_of_alone(tiny):
    ds = mixed(tiny)
    iv = build(ActivScalar, tiny, ds, init_std=0.3)
    r = evaluate(tiny, iv, ds, batch_size=3)
    alone = [evaluate(tiny, iv, ds.subset([i])) for i in range(len(ds))]
    for m in ("effectiveness", "faithfulness"):
        want = sum(a[m] for a in alone) / len(alone)
        assert r[m] == pytest.approx(want, rel=REL, abs=1e-7)


def test_column_interventions_refuse_mixed_lengths(tiny_gpt2):
    ds = mixed(tiny_gpt2)
    iv = ActivScalar.for_model(tiny_gpt2, sites=["mlp_out"], n_pos=ds.n_pos)
    with pytest.raises(ValueError, match="for_dataset"):
        evaluate(tiny_gpt2, iv, ds)


def test_equal_lengths_auto_is_the_token_axis(tiny_gpt2):
    from mechsteer.tasks import ccc

    ds = ccc(tiny_gpt2, n=4)
    iv = build(ActivScalar, tiny_gpt2, ds)
    assert iv.slots is None and iv.n_pos == ds.n_pos and iv.token_index(ds) is None


@pytest.mark.parametrize("kind", [DynScalar, ActivScalar])
def test_trains_on_mixed_lengths_and_loss_decreases(tiny_llama, kind):
    ds = mixed(tiny_llama)
    iv = build(kind, tiny_llama, ds)
    hist = train(tiny_llama, iv, ds, TrainConfig(epochs=30, batch_size=len(ds), lr=3e-2, progress=False))
    assert hist["psi"].iloc[-1] > hist["psi"].iloc[0]
    assert_alone(tiny_llama, iv, ds)  # the trained intervention: padding still changes nothing


def test_fv_injection_padded_equals_alone(tiny):
    ds = mixed(tiny)
    gen = torch.Generator().manual_seed(0)
    fv = torch.randn(tiny.cfg.d_model, generator=gen)
    mean_z = torch.randn(tiny.cfg.n_layers, tiny.cfg.n_heads, tiny.cfg.d_head, generator=gen)
    for inject in (lambda last: inject_fv(tiny, fv, 0, 2.0, last=last),
                   lambda last: inject_dfv(tiny, mean_z, [(0, 1), (1, 0)], 1.0, last=last)):
        with torch.no_grad(), inject(ds.last):
            together = answer_logits(tiny, ds.tokens, ds.last)
        for i in range(len(ds)):
            one = ds.subset([i])
            with torch.no_grad(), inject(None):
                alone = answer_logits(tiny, one.tokens)
            torch.testing.assert_close(together[i : i + 1], alone, rtol=REL, atol=REL * alone.abs().max().item())
        with torch.no_grad():
            plain = answer_logits(tiny, ds.tokens, ds.last)
        assert not torch.allclose(together, plain)


@pytest.mark.parametrize("kind", [ActivScalar, DynScalar])
def test_generation_per_prompt_never_continues_after_pads(tiny_gpt2, kind):
    ds = mixed(tiny_gpt2)
    iv = build(kind, tiny_gpt2, ds, init_std=0.3)
    pick = [int(ds.lengths.argmin()), int(ds.lengths.argmax())]
    sub = ds.subset(pick)
    texts = steered_generate(tiny_gpt2, iv, sub, beta=1.0, max_new_tokens=3, stop_at_eos=False)
    for j, i in enumerate(pick):
        alone = steered_generate(tiny_gpt2, iv, ds.subset([i]), beta=1.0, max_new_tokens=3, stop_at_eos=False)
        assert texts[j] == alone[0] and texts[j].startswith(ds.prompts[i])
    zero = steered_generate(tiny_gpt2, iv, sub, beta=0.0, max_new_tokens=3, stop_at_eos=False)
    plain = [tiny_gpt2.generate(sub.tokens[j : j + 1, : sub.lengths[j]], max_new_tokens=3, do_sample=False,
                                verbose=False, stop_at_eos=False) for j in range(2)]
    assert zero == [tiny_gpt2.tokenizer.decode(p[0], skip_special_tokens=True) for p in plain]


def test_transfer_all_templates_is_one_row(tiny_gpt2):
    from mechsteer.tasks import ccc

    sets = {"t0": ccc(tiny_gpt2, n=8), "t1": ccc(tiny_gpt2, n=8, template=1)}
    make = lambda m, ds: ActivScalar.for_dataset(m, ds, sites=["mlp_out"])  # noqa: E731
    df, ivs = transfer_matrix(tiny_gpt2, make, sets, TrainConfig(epochs=1, progress=False), include_all=True,
                              return_interventions=True, progress=False)
    assert list(df.index) == ["(none)", "t0", "t1", "(all)"]
    assert ivs["(all)"].slots is not None  # trained on both lengths together: end-relative slots
    assert df.loc["(all)", "effectiveness"].notna().all()
    assert df.loc["t0", ("effectiveness", "t1")] != df.loc["t0", ("effectiveness", "t1")]  # NaN: columns of t0


def test_fv_pipeline_on_mixed_lengths_equals_alone(tiny_llama):
    """The FV pipeline never pads (FVPrompts.batches groups one length): per-prompt means
    and steered ranks on prompts of different lengths equal each prompt's alone."""
    from mechsteer.fv.evaluate import zero_shot_accuracy
    from mechsteer.fv.means import mean_head_z
    from mechsteer.tasks.fv import FVPrompts

    texts = ["Q: hot A:", "Q: very tall tree A:", "Q: a cold and wet day A:", "Q: up A:"]
    toks = [tiny_llama.to_tokens(t)[0] for t in texts]
    assert len({len(t) for t in toks}) > 2
    n = len(texts)
    p = FVPrompts("antonym", "zero_shot", texts, toks, torch.tensor([5, 6, 7, 8]), [[]] * n, [-1] * n, texts, texts)
    alone = [p.subset([i]) for i in range(n)]
    mean = mean_head_z(tiny_llama, p, progress=False)
    torch.testing.assert_close(mean, sum(mean_head_z(tiny_llama, a, progress=False) for a in alone) / n)
    fv = torch.randn(tiny_llama.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 5
    steer = lambda: inject_fv(tiny_llama, fv, 1, 1.0)  # noqa: E731
    ranks = zero_shot_accuracy(tiny_llama, p, steer=steer, batch_size=2, progress=False)["rank"]
    assert ranks.tolist() == [zero_shot_accuracy(tiny_llama, a, steer=steer, progress=False)["rank"].item() for a in alone]


@pytest.mark.integration
def test_smollm2_padding_changes_nothing(smollm2):
    """On SmolLM2: CCC over all templates, mixed lengths (multi-token answers kept)."""
    from mechsteer.tasks import ccc

    ds = ccc(smollm2, n=6, template=None, same_length=False)
    assert ds.is_padded
    for kind in (ActivScalar, DynScalar):
        iv = kind.for_dataset(smollm2, ds, sites=["attn_out", "mlp_out"], init_std=0.05, axis="end")
        assert_alone(smollm2, iv, ds)
