"""iwd_fast: influence-weighted dataset distillation with fused per-sample-gradient dot products.

Core operation: ``grad_dot(model, x, y, directions)`` -> s_i = <grad_theta loss_i, v> without
materialising per-sample gradients, and ``capture(model)`` to get the same from a backward the caller
already runs. Layers: ``scoring`` (the engine) <- ``weighting`` (the method) <- ``distill`` (the
distillers) <- ``app`` (command line and jobs); see docs/DESIGN.md.
"""
from .scoring import IMPLS, Capture, ImplUnavailableError, UnsupportedLayerError, capture, grad_dot, grad_norm_sq
from .weighting import (IndexedClassSampler, InfluenceWeighter, select_initial, sign_for, weighted_class_mean,
                        weighted_cross_entropy)

__version__ = "0.1.0"

__all__ = [
    "grad_dot",
    "grad_norm_sq",
    "capture",
    "Capture",
    "IMPLS",
    "ImplUnavailableError",
    "UnsupportedLayerError",
    "InfluenceWeighter",
    "sign_for",
    "IndexedClassSampler",
    "select_initial",
    "weighted_cross_entropy",
    "weighted_class_mean",
    "__version__",
]
