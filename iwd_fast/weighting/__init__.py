"""The method, usable in any distillation loop: instance weights from influence scores (``weighter``, with its
score transforms and sign policies in ``transforms`` and its file in ``weighter_file``), the influence
directions (``targets``), quality metrics (``metrics``), the drop-in pieces that put weights into a loop
(``dropin``), how strongly to weight (``trust``: out-of-sample noise estimates), and the in-loop recipe in
one object (``in_loop``)."""
from .dropin import (IndexedClassSampler, IndexedDataset, normalize_weights, select_initial, weighted_class_mean,
                     weighted_cross_entropy)
from .in_loop import IN_LOOP_DEFAULTS, InLoopWeights
from .targets import TARGETS
from .metrics import auroc, weight_mass_on
from .trust import (CROSSFIT_DEFAULTS, NoiseEstimate, crossfit_probabilities, estimate_noise, trust_weights,
                    trusted_weights)
from .transforms import SIGN_POLICIES, TRANSFORMS, sign_for
from .weighter import WEIGHTER_DEFAULTS, InfluenceWeighter
from .weighter_file import labels_fingerprint

__all__ = ["InfluenceWeighter", "SIGN_POLICIES", "TRANSFORMS", "WEIGHTER_DEFAULTS", "NoiseEstimate",
           "crossfit_probabilities", "estimate_noise", "trust_weights", "trusted_weights", "CROSSFIT_DEFAULTS",
           "InLoopWeights", "IN_LOOP_DEFAULTS", "sign_for", "labels_fingerprint", "auroc", "weight_mass_on",
           "IndexedClassSampler", "IndexedDataset", "normalize_weights", "select_initial", "weighted_class_mean",
           "weighted_cross_entropy", "TARGETS"]
