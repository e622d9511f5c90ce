"""iwd_fast: influence-weighted dataset distillation with fused per-sample-gradient dot products.

Core operation: ``grad_dot(model, x, y, directions)`` -> s_i = <grad_theta loss_i, v> without
materialising per-sample gradients, and ``capture(model)`` to get the same from a backward the caller
already runs. See README.md.
"""
from .capture import Capture, capture
from .scoring import grad_dot, grad_norm_sq
from ._dispatch import IMPLS, ImplUnavailableError
from .layer_rules import UnsupportedLayerError

__version__ = "0.1.0"

__all__ = [
    "grad_dot",
    "grad_norm_sq",
    "capture",
    "Capture",
    "IMPLS",
    "ImplUnavailableError",
    "UnsupportedLayerError",
    "__version__",
]
