"""iwd_fast: influence-weighted dataset distillation with fused per-sample-gradient dot products.

Core operation: ``grad_dot(model, x, y, directions)`` -> s_i = <grad_theta loss_i, v> without
materialising per-sample gradients, and ``capture(model)`` to get the same from a backward the caller
already runs. Layers: ``scoring`` (the engine) <- ``weighting`` (the method) <- ``distill`` (the
distillers) <- ``app`` (command line and jobs); see docs/DESIGN.md.
"""
import functools as _functools
import inspect as _inspect

from .scoring import IMPLS, Capture, ImplUnavailableError, UnsupportedLayerError, capture, grad_dot, grad_norm_sq
from .scoring.dataset import ScoreResult
from .scoring.dataset import score_dataset as _score_dataset
from .weighting import (IndexedClassSampler, InfluenceWeighter, InLoopWeights, select_initial, sign_for, trusted_weights,
                        weighted_class_mean, weighted_cross_entropy)

__version__ = "0.1.0"


@_functools.wraps(_score_dataset)
def score_dataset(model, data, target="validation", *, progress=True, **options):
    # The engine imports torch only; here its progress bar becomes tqdm's (images/s). progress=False: silent.
    if progress is True:
        from tqdm.auto import tqdm as progress
    return _score_dataset(model, data, target, progress=progress or None, **options)


_engine_signature = _inspect.signature(_score_dataset)
score_dataset.__signature__ = _engine_signature.replace(parameters=[
    p.replace(default=True) if p.name == "progress" else p for p in _engine_signature.parameters.values()])

__all__ = [
    "grad_dot",
    "grad_norm_sq",
    "score_dataset",
    "ScoreResult",
    "capture",
    "Capture",
    "IMPLS",
    "ImplUnavailableError",
    "UnsupportedLayerError",
    "InfluenceWeighter",
    "InLoopWeights",
    "sign_for",
    "IndexedClassSampler",
    "select_initial",
    "trusted_weights",
    "weighted_cross_entropy",
    "weighted_class_mean",
    "__version__",
]
