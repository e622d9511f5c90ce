"""iwd_fast: influence-weighted dataset distillation with fused per-sample-gradient dot products.

Core operation: ``grad_dot(model, x, y, directions)`` -> s_i = <grad_theta loss_i, v> without
materialising per-sample gradients, and ``capture(model)`` to get the same from a backward the caller
already runs. See README.md.
"""
from .capture import Capture, capture
from .scoring import grad_dot, grad_norm_sq
from ._dispatch import IMPLS, ImplUnavailableError
from .layer_rules import UnsupportedLayerError
from .weighting import InfluenceWeighter, sign_for
from .hooks import IndexedClassSampler, select_initial, weighted_class_mean, weighted_cross_entropy
from . import hooks, weighting

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
