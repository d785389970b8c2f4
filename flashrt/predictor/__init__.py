"""Low-rank sparsity predictors for FFN neurons: runtime scoring, fitting, calibration, storage.

    from flashrt.predictor import PredictorSet
    preds = PredictorSet.load(model_dir)           # predictors.npz, checksum verified
    ids = preds[layer].select(x)                   # int64 neuron ids, best first

Fit them with `flashrt.calibration.calibrate(model_dir)` (or `flashrt calibrate --model DIR`),
which records activations with the runtime and calls `fit_predictors` here. This package
never imports the runtime; the runtime imports it only to score.
"""
from .calibrate import CalibrationReport, allocate_keep_fractions, fit_predictors
from .fit import data_aware_lowrank, fit_layer
from .lowrank import (LowRankPredictor, default_rank, default_ranks, ffn_macs, predictor_macs, select_from_scores,
                      topk_mask)
from .store import PREDICTORS_NAME, PredictorSet

__all__ = ["LowRankPredictor", "PredictorSet", "PREDICTORS_NAME", "fit_layer", "data_aware_lowrank",
           "fit_predictors", "allocate_keep_fractions", "CalibrationReport", "default_rank",
           "default_ranks", "predictor_macs", "ffn_macs", "select_from_scores", "topk_mask"]
