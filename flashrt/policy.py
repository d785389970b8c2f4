"""Which neuron selection a flash-mode budget gets, from what calibration measured it costs.

Calibration stores, with the predictors, the perplexity ratio to dense per neuron-cache share
(flashrt.predictor.quality.QualityCurve) for two scorers:
  product     the low-rank estimates of gate and up (under 5% of the FFN's multiply-adds)
  gate-first  the exact gate from gate rows held in DRAM (1/3 of the FFN's bytes more, an
              extra n * d multiply-adds per layer) times the low-rank up estimate
A budget gives each a cache share (gate-first's is smaller: the gate rows take their part).
`choose_policy` picks the one with the lower measured ratio. Where even that is above
GOOD_RATIO (+5%), the predictors cannot keep quality at this budget (on SmolLM2 the window
needs about 90% of each layer cached): with the default selection flash mode then computes
every neuron (select "all": exact, and faster than a predictor whose cache churns), with
select="predictor" asked for explicitly it keeps the predictors. Above WARN_RATIO (+10%)
select="predictor" warns once, naming the budget that reaches GOOD_RATIO; the default (exact
here) warns only when the predictors would run, and save work, at that budget.

Where the predictors keep quality, the default selection still computes every neuron when that
does no more work per token on either count (`all_does_less`): select "all" computes the whole
FFN and reads what its cache cannot hold; the predictors compute what the curve measured (the
window's union, the overflow) plus their own scoring (gate-first: the exact gate, n * d
multiply-adds per layer) and read what it measured entering the cache. On SmolLM2 the window
computes ~92% of the FFN at 50% selected, so with no budget the predictors took 1.3x the
multiply-adds of the dense FFN and decoded 2.5x slower than select="all" (bench/results/
budget_policy_q4_1.md); there every neuron is computed (exact).
"""
from __future__ import annotations

import dataclasses
import warnings

from .budget import UNITEMIZED_SHARE, fmt_bytes, plan_budget
from .errors import BudgetError, FlashrtError
from .ffn.selection import gate_row_width
from .predictor.lowrank import ffn_macs
from .predictor.quality import GOOD_RATIO, WARN_RATIO


@dataclasses.dataclass
class Policy:
    select: str                    # "all" | "oracle" | "predictor"
    gate_first: bool               # predictor scoring with the exact gate (gate rows resident)
    plan: object                   # BudgetPlan
    expected_ratio: float | None   # measured perplexity ratio at this budget (None: not measured)
    warning: str | None = None


def gate_bytes(files) -> int:
    """DRAM the exact gate rows of every layer take (gate-first scoring), as stored: float16/32
    rows, or the quantized blocks (the GEMV kernel runs them as they are)."""
    return files.n_layers * files.n_neurons * gate_row_width(files) * files.dtype.itemsize


def _budget_for_share(files, plan, share: float, extra: int, replan) -> int:
    """The smallest budget (to 1 MB) whose plan caches `share` of every layer, with `extra` more bytes held.
    replan(budget, extra) -> BudgetPlan (the default context, and so the fixed part, depends on the budget:
    bisected, not estimated from `plan`)."""
    rows = int(-(-share * files.n_neurons // 1))

    def enough(mb):
        try:
            return replan(mb * 10 ** 6, extra).cache_rows >= rows
        except BudgetError:
            return False

    per_row = files.ffn_row_bytes * files.n_layers
    hi = int((plan.total - plan.cache_bytes + extra + rows * per_row) / (1 - UNITEMIZED_SHARE)) // 10 ** 6 + 1
    while not enough(hi):
        hi *= 2
    lo = 0                                            # enough(lo) is False
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid
    return hi * 10 ** 6


SCORINGS = ("product", "gate-first")


def choose_policy(files, args, mode, select, requested, memory_budget, max_context, n_ctx_model, predictor_bytes,
                  tokenizer_bytes, pset=None, scoring=None) -> Policy:
    """The selection and plan for a flash/naive Generator (args: the family's ModelArgs).

    select: the selection choose_select settled on; requested: what the caller passed (None: default).
    pset: the loaded PredictorSet when select == "predictor" (its quality curves decide).
    scoring: "product", "gate-first" or None (the one measured better at this budget)."""
    if scoring is not None and scoring not in SCORINGS:
        raise FlashrtError(f"scoring must be one of {', '.join(SCORINGS)} or None; got {scoring!r}")
    try:
        plan = plan_budget(files, args, mode, memory_budget, max_context, n_ctx_model,
                           predictor_bytes if select == "predictor" else 0, tokenizer_bytes)
    except BudgetError:
        if select != "predictor" or requested is not None or scoring is not None:
            raise
        # the default selection under a budget too small for the predictors: every neuron (exact)
        return Policy("all", False, plan_budget(files, args, mode, memory_budget, max_context, n_ctx_model, 0,
                                                tokenizer_bytes), None)
    if scoring == "gate-first" and (select != "predictor" or pset is None or pset.kind != "product"):
        raise FlashrtError("scoring='gate-first' needs flash mode with the predictors of a gated FFN")
    if mode != "flash" or select != "predictor" or pset is None or pset.kind != "product":
        return Policy(select, False, plan, None)
    if scoring == "gate-first":
        plan_g = plan_budget(files, args, mode, memory_budget, max_context, n_ctx_model,
                             predictor_bytes + gate_bytes(files), tokenizer_bytes)
        curve = pset.quality_curve_gate_first
        return Policy(select, True, plan_g, None if curve is None else curve.ratio_at(plan_g.cache_share))
    curve_p = pset.quality_curve
    curve_g = pset.quality_curve_gate_first if pset.has_up_estimates and scoring is None else None
    options = []                                       # (ratio, gate_first, plan)
    if curve_p is not None:
        options.append((curve_p.ratio_at(plan.cache_share), False, plan))
    elif scoring == "product":
        return Policy(select, False, plan, None)
    if curve_g is not None:
        try:
            plan_g = plan_budget(files, args, mode, memory_budget, max_context, n_ctx_model,
                                 predictor_bytes + gate_bytes(files), tokenizer_bytes)
            options.append((curve_g.ratio_at(plan_g.cache_share), True, plan_g))
        except BudgetError:
            pass                                       # the gate rows do not fit this budget
    if not options:
        return Policy(select, False, plan, None)
    ratio, gate_first, best_plan = min(options, key=lambda o: (o[0], not o[1]))
    if plan.budget is None or ratio <= GOOD_RATIO:
        if requested is None:
            plan_all = plan_budget(files, args, mode, memory_budget, max_context, n_ctx_model, 0, tokenizer_bytes)
            if all_does_less(pset, gate_first, best_plan.cache_share, plan_all.cache_share):
                return Policy("all", False, plan_all, None)
        return Policy(select, gate_first, best_plan, ratio)

    def replan(budget, extra):
        return plan_budget(files, args, mode, budget, max_context, n_ctx_model, predictor_bytes + extra,
                           tokenizer_bytes)

    warning = None
    if ratio > WARN_RATIO:
        good = _good_budget(files, plan, curve_p, curve_g, replan)
        where = (f"at a memory budget of {fmt_bytes(plan.budget)} the neuron caches hold "
                 f"{best_plan.cache_share:.0%} of each layer, where calibration measured the predictors at "
                 f"{100 * (ratio - 1):+.0f}% perplexity")
        if requested is not None:
            hint = (f"a budget of {fmt_bytes(good[0])} reaches {100 * (GOOD_RATIO - 1):+.0f}% with them" if good
                    else f"no measured budget reaches {100 * (GOOD_RATIO - 1):+.0f}% with them")
            warning = f"{where}; {hint}"
        elif good and _predictors_run_at(files, args, mode, max_context, n_ctx_model, predictor_bytes,
                                          tokenizer_bytes, pset, *good):
            # the default computes every neuron here (exact): worth a word only when a larger budget would
            # let the predictors do less work (on SmolLM2 they never do, and the hint would mislead)
            warning = (f"{where}; computing every neuron instead (select='all': exact, reads more); a budget of "
                       f"{fmt_bytes(good[0])} lets the predictors run at {100 * (GOOD_RATIO - 1):+.0f}%")
    if requested is None:   # the default selection keeps quality: every neuron, exact
        return Policy("all", False, plan_budget(files, args, mode, memory_budget, max_context, n_ctx_model, 0,
                                                tokenizer_bytes), None, warning)
    return Policy(select, gate_first, best_plan, ratio, warning)


def _predictors_run_at(files, args, mode, max_context, n_ctx_model, predictor_bytes, tokenizer_bytes, pset,
                       budget, gate_first) -> bool:
    """Whether the default selection would use the predictors (scorer `gate_first`) at `budget`, that is
    whether they do less work there than computing every neuron (`all_does_less`)."""
    extra = gate_bytes(files) if gate_first else 0
    share = plan_budget(files, args, mode, budget, max_context, n_ctx_model, predictor_bytes + extra,
                        tokenizer_bytes).cache_share
    share_all = plan_budget(files, args, mode, budget, max_context, n_ctx_model, 0, tokenizer_bytes).cache_share
    return not all_does_less(pset, gate_first, share, share_all)


def predictor_work(pset, gate_first: bool, share: float):
    """(computed, read) per token as shares of the dense FFN's multiply-adds and of its neurons,
    expected of the predictors at a cache share: the curve's computed and read fractions (linear
    between points) plus the scoring's multiply-adds (gate-first: exact gate and up estimate)."""
    curve = pset.quality_curve_gate_first if gate_first else pset.quality_curve
    p0 = pset[0]
    dense = ffn_macs(True, p0.dim, p0.n_neurons) * len(pset)
    scoring = sum(p.gate_first_macs() if gate_first else p.macs for p in pset)
    return curve.value_at(share, "computed") + scoring / dense, curve.value_at(share, "read")


def all_does_less(pset, gate_first: bool, share: float, share_all: float) -> bool:
    """True when select "all" at cache share `share_all` does no more work per token than the
    predictors at `share` on either count: it computes the whole FFN (1.0) and reads what its
    cache does not hold (1 - share_all of the neurons, every token)."""
    computed, read = predictor_work(pset, gate_first, share)
    return computed >= 1.0 and read >= 1.0 - share_all


def _good_budget(files, plan, curve_p, curve_g, replan):
    """(budget, gate_first): the smallest budget at which one of the scorers' curves reaches GOOD_RATIO,
    and which scorer; or None."""
    found = []
    if curve_p is not None and curve_p.share_for(GOOD_RATIO) is not None:
        found.append((_budget_for_share(files, plan, curve_p.share_for(GOOD_RATIO), 0, replan), False))
    if curve_g is not None and curve_g.share_for(GOOD_RATIO) is not None:
        found.append((_budget_for_share(files, plan, curve_g.share_for(GOOD_RATIO), gate_bytes(files), replan),
                      True))
    return min(found) if found else None


def warn_once(message: str) -> None:
    warnings.warn(f"flashrt: {message}", stacklevel=4)


def curve_budgets(files, args, curve, predictor_bytes, tokenizer_bytes, gate_first=False, max_context=None,
                  n_ctx_model=2048):
    """The memory budget (bytes) at which flash mode caches each point's share of the curve."""
    extra = gate_bytes(files) if gate_first else 0

    def replan(budget, extra):
        return plan_budget(files, args, "flash", budget, max_context, n_ctx_model, predictor_bytes + extra,
                           tokenizer_bytes)

    plan = plan_budget(files, args, "flash", None, max_context, n_ctx_model, predictor_bytes + extra, tokenizer_bytes)
    return [_budget_for_share(files, plan, p["cache_share"], extra, replan) for p in curve.points]
