"""The budget planner (flashrt/budget.py) alone: sizes parsed, plans that add up and stay
under the budget, the minimum named and sufficient, the KV figure against a real KVCache."""
import pytest
from hypothesis import given, settings, strategies as st

from flashrt.api import model_args
from flashrt.budget import (UNITEMIZED_SHARE, KV_BUDGET_SHARE, MIN_CACHE_SHARE, MIN_CONTEXT, check_dense_budget,
                            kv_bytes_per_token, parse_size, plan_budget)
from flashrt.errors import BudgetError
from flashrt.format import ModelFiles


@pytest.mark.parametrize("text, want", [(200, 200), ("200MB", 200_000_000), ("1.5 GiB", 3 * 2**29),
                                        ("512kib", 512 * 1024), (" 7 ", 7), (2.5e3, 2500)])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["lots", "-5MB", 0, True, "1.5 XB", ""])
def test_parse_size_refuses(bad):
    with pytest.raises(BudgetError):
        parse_size(bad)


def opened(path):
    files = ModelFiles.open(path)
    return files, model_args(files)[1]


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_kv_bytes_per_token_is_what_the_models_cache_allocates(tiny_models, name):
    files, args = opened(tiny_models[name])
    family = model_args(files)[0]
    model = family.Model(args, files.load_resident(), None, None)
    kv = model.make_cache(16)
    assert kv_bytes_per_token(args) * kv.max_seq == kv.nbytes


def test_no_budget_caches_every_neuron(tiny_models):
    files, args = opened(tiny_models["llama"])
    plan = plan_budget(files, args, "flash", None, None, 2048)
    assert plan.cache_rows == files.n_neurons and plan.cache_share == 1.0
    assert plan.total == (plan.resident_bytes + plan.kv_bytes + plan.working_bytes + plan.cache_bytes)
    assert plan_budget(files, args, "naive", None, None, 2048).cache_rows == 0


@settings(max_examples=40, deadline=None)
@given(frac=st.floats(0.0, 1.0), mode=st.sampled_from(["flash", "naive"]))
def test_a_plan_stays_under_its_budget_or_names_a_minimum_that_works(tiny_models, frac, mode):
    files, args = opened(tiny_models["llama"])
    full = plan_budget(files, args, mode, None, 64, 2048).total
    budget = max(1, int(frac * 1.2 * full))
    try:
        plan = plan_budget(files, args, mode, budget, 64, 2048)
    except BudgetError as e:
        value, unit = str(e).split("at least ")[1].split(" ")[:2]
        named = parse_size(value + unit)  # printed to 0.1 of its unit
        assert named * 1.01 > budget  # the minimum it names is above what was given
        enough = int(named * 1.01)
        assert plan_budget(files, args, mode, enough, 64, 2048).total <= enough  # and it is enough
        return
    assert plan.total <= budget
    if mode == "flash":
        assert plan.cache_rows >= max(1, int(MIN_CACHE_SHARE * files.n_neurons))
        usable = int(budget * (1 - UNITEMIZED_SHARE))  # the planner keeps a share back for what it does not itemize
        rest = usable - (plan.total - plan.cache_bytes)
        if plan.cache_rows < files.n_neurons:  # as many rows as fit, no fewer
            assert rest - plan.cache_bytes < files.ffn_row_bytes * files.n_layers
    else:
        assert plan.cache_rows == 0


def test_the_default_context_shrinks_under_a_tight_budget(tiny_models):
    """Under a budget the default context halves until its KV cache takes at most
    KV_BUDGET_SHARE of the budget (not below MIN_CONTEXT); the plan (or the refusal) uses it."""
    files, args = opened(tiny_models["llama"])
    per_token = kv_bytes_per_token(args)
    assert plan_budget(files, args, "flash", None, None, 2048).max_context == 2048
    for budget in (5_000_000, 2_000_000, 50_000_000):
        want = 2048
        while want > MIN_CONTEXT and want * per_token > KV_BUDGET_SHARE * budget:
            want //= 2
        try:
            got = plan_budget(files, args, "flash", budget, None, 2048).max_context
        except BudgetError as e:  # too small for this model: the refusal names the context it planned
            got = int(str(e).split(" tokens")[0].split()[-1])
        assert got == want, budget
    assert plan_budget(files, args, "flash", None, 100, 2048).max_context == 100  # asked for: kept


def test_dense_mode_refuses_a_budget_below_the_whole_model(tiny_models):
    files, args = opened(tiny_models["opt"])
    whole = files.resident_bytes + files.ffn_bytes
    with pytest.raises(BudgetError, match="dense mode keeps the whole model"):
        check_dense_budget(files, args, whole, 64)
    check_dense_budget(files, args, 10 * whole + 50_000_000, 64)  # fits: no error
