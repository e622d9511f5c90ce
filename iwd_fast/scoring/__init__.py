"""The scoring engine: per-sample gradient dot products s_i = <grad_theta loss_i, v> and squared norms,
without materialising per-sample gradients.

Imports torch only. ``grad_dot`` / ``grad_norm_sq`` score a batch through a model; ``capture`` scores
from a backward the caller already runs. ``dispatch`` is the one place an implementation is chosen;
``reference`` holds the eager layer ops (the specification), ``oracle`` the vmap(grad) model oracle,
``rules`` the per-layer rules, ``backends/`` the compiled C++/CUDA and Triton layer ops.
"""
from .api import grad_dot, grad_norm_sq
from .capture import Capture, capture
from .dispatch import IMPLS, ImplUnavailableError
from .rules import UnsupportedLayerError

__all__ = ["grad_dot", "grad_norm_sq", "capture", "Capture", "IMPLS", "ImplUnavailableError",
           "UnsupportedLayerError"]
