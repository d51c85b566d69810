"""Paper 000 Table 1 like for like (mechsteer.fv.timing): every method on the same prompts
at the same batch sizes, rows complete and consistent."""

import pytest

from mechsteer.fv.means import mean_head_z
from mechsteer.fv.timing import METHODS, table1
from mechsteer.tasks.fv import corrupt, fv_prompts


@pytest.fixture(scope="module")
def setup(tiny_llama):
    clean = fv_prompts(tiny_llama, "antonym", n=3, instructions=[0])
    return tiny_llama, clean, corrupt(tiny_llama, clean), mean_head_z(tiny_llama, clean, progress=False)


def test_every_method_same_prompts_each_batch_size(setup):
    model, clean, corrupted, mean_z = setup
    t = table1(model, clean, corrupted, mean_z, batch_sizes=(1, 3), naive_layers=1)
    assert list(t["method"]) == list(METHODS) * 2 and list(t["batch_size"]) == [1] * 4 + [3] * 4
    assert (t["n_prompts"] == 3).all() and (t["samples_per_minute"] > 0).all()
    assert (t[t["method"] == "naive"]["timed_layers"] == 1).all()  # scaled from one layer, said in the row
    assert (t[t["method"] != "naive"]["timed_layers"] == model.cfg.n_layers).all()
    assert t[t["method"] == "naive"]["speedup_vs_naive"].eq(1.0).all()
    rate = t["samples_per_minute"] * t["seconds"] / 60  # = n_prompts: rate and time agree
    assert rate.round(6).eq(3).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"methods": ("aie",)}, "methods"),
    ({"methods": "lrp"}, "methods"),
    ({"batch_sizes": 4}, "batch_sizes"),
    ({"batch_sizes": (0,)}, "batch_sizes"),
    ({"naive_layers": 0}, "naive_layers"),
])
def test_bad_arguments_named(setup, kwargs, match):
    model, clean, corrupted, mean_z = setup
    with pytest.raises((ValueError, TypeError), match=match):
        table1(model, clean, corrupted, mean_z, **kwargs)


def test_clean_and_corrupted_must_match(setup):
    model, clean, corrupted, mean_z = setup
    with pytest.raises(ValueError, match="same prompts"):
        table1(model, clean, corrupted.subset([0, 1]), mean_z)
