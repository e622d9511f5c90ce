"""The method, usable in any distillation loop: instance weights from influence scores (``weighter``),
the influence directions (``targets``), quality metrics (``metrics``) and the drop-in pieces that put
weights into a loop (``dropin``)."""
from .dropin import (IndexedClassSampler, IndexedDataset, normalize_weights, select_initial, weighted_class_mean,
                     weighted_cross_entropy)
from .targets import TARGETS
from .metrics import auroc, weight_mass_on
from .weighter import SIGN_POLICIES, TRANSFORMS, InfluenceWeighter, labels_fingerprint, sign_for

__all__ = ["InfluenceWeighter", "SIGN_POLICIES", "TRANSFORMS", "sign_for", "labels_fingerprint", "auroc", "weight_mass_on",
           "IndexedClassSampler", "IndexedDataset", "normalize_weights", "select_initial", "weighted_class_mean",
           "weighted_cross_entropy", "TARGETS"]
