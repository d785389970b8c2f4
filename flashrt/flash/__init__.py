"""The FFN on flash: selection -> window/cache -> loader -> kernels; the budget planner; stats."""
from __future__ import annotations

import warnings

from ..errors import FlashrtError
from .budget import BudgetPlan, parse_size, plan_budget  # noqa: F401

SELECTS = ("all", "oracle", "predictor")


def predictors_path(files):
    return files.path / "predictors.npz"


def choose_select(files, select: str | None) -> str:
    """The selection policy: the caller's, else the predictor when the model has one, else all."""
    if select is not None:
        if select not in SELECTS:
            raise FlashrtError(f"select must be one of {', '.join(SELECTS)}; got {select!r}")
        if select == "predictor" and not predictors_path(files).is_file():
            raise FlashrtError(f"{files.path} has no predictors; run `flashrt calibrate --model {files.path}` first")
        return select
    if predictors_path(files).is_file():
        return "predictor"
    warnings.warn(
        f"{files.path.name} has no sparsity predictors, so flash mode reads every FFN neuron (select='all'); "
        f"run `flashrt calibrate --model {files.path}` to read only the neurons each token needs",
        stacklevel=3,
    )
    return "all"


def build_flash_ffn(files, weights, plan: BudgetPlan, mode: str, select: str, sparsity, window: int, n_threads: int):
    """The FlashFFN for an opened model, its selector built from `select`."""
    from ..ffn_spec import ffn_spec
    from .ffn import FlashFFN
    from .selection import AllSelector, OracleSelector, PredictorSelector

    if not isinstance(window, int) or window < 1:
        raise FlashrtError(f"window must be a positive integer, got {window!r}")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise FlashrtError(f"sparsity must be in [0, 1), got {sparsity!r}")
    spec = ffn_spec(files.architecture, files.config, weights)
    keep = None if sparsity is None else 1.0 - sparsity
    if mode == "naive" or select == "all":
        selector = AllSelector(files.n_neurons)
    elif select == "oracle":
        selector = OracleSelector(files, spec.gated, spec.act_code, spec.up_bias, keep if keep is not None else 0.5, n_threads)
    else:
        from ..predictor import PredictorSet

        selector = PredictorSelector(PredictorSet.load(files.path, files.dim, files.n_neurons, files.config["num_hidden_layers"]), keep)
    return FlashFFN(files, spec, plan, mode, selector, window, n_threads)
