"""From influence scores to per-instance weights (METHOD.md sections 2 and 4).

:class:`InfluenceWeighter` keeps one running score per real instance (EMA over refreshes) and turns the
scores into weights with a per-class standardised, temperature-scaled softmax whose mean is 1 in every
class (METHOD.md section 4):

    z_i = sign * (s_i - mean_c) / (std_c + eps)            transform "zscore" (unbounded)
    z_i = Phi^-1((rank_c(sign * s_i) - 1/2) / n_c)         transform "rank" (normal quantile of the rank)
    w_i = n_c * softmax_c(z_i / temperature)
    w_i <- (1 - floor) * w_i + floor

"rank" bounds the weights by design: z lies within +-Phi^-1(1 - 1/(2 n_c)) whatever the tail of the
scores (about +-3.7 for n_c = 5000), so no single instance can dominate its class, while a z-score of
a heavy-tailed score can reach hundreds. With ``standardize``, each update's scores are z-scored per
class within that update before they enter the EMA, so scores taken at different networks (whose
scales and offsets differ) are comparable.

Convention: after multiplying by ``sign`` a LARGER score means "upweight". Callers pass the raw score of
their target and take ``sign`` from :func:`sign_for` (the table of targets is in ``weighting.transforms``).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch

from ..scoring.checks import as_labels, format_indices
from .metrics import weight_mass_on
from .transforms import TRANSFORMS, rank_normal, zscore
from .weighter_file import check_fingerprint, labels_fingerprint, read_weighter, write_weighter

__all__ = ["InfluenceWeighter", "WEIGHTER_DEFAULTS"]



# The one set of defaults: the class, the built-in loops (``IWDSpec`` takes its defaults from here) and the
# README's recipes. "rank" with per-update standardisation is the bounded transform the loops were measured
# with (benchmarks/RESULTS.md); a bare z-score softmax reached weights in the hundreds.
WEIGHTER_DEFAULTS: Dict[str, object] = {"temperature": 1.0, "ema": 0.8, "floor": 0.0, "transform": "rank",
                                        "standardize": True}


def _check_hparams(sign: int, ema: float, eps: float, where: str) -> None:
    if sign not in (1, -1):
        raise ValueError(f"{where}: sign must be +1 or -1, got {sign!r}")
    if not 0.0 <= float(ema) <= 1.0:
        raise ValueError(f"{where}: ema must lie in [0, 1], got {ema}")
    if not float(eps) > 0.0:
        raise ValueError(f"{where}: eps must be > 0, got {eps}")


class InfluenceWeighter:
    """Per-instance EMA of influence scores over a dataset of ``n`` instances, turned into weights.

    Args:
        labels: int64 [n], values in [0, num_classes).
        num_classes: number of classes C.
        temperature: softmax temperature tau > 0; ``math.inf`` gives uniform weights.
        ema: beta in [0, 1]; a later score s_new updates s <- beta * s_old + (1 - beta) * s_new.
        floor: lambda in [0, 1]; mixes the weights with uniform (with the prior's, given one):
            w <- (1 - lambda) * w + lambda * w_prior.
        sign: +1 or -1, applied to the z-scores (see :func:`sign_for`).
        eps: added to the per-class standard deviation.
        transform: "zscore" or "rank" (see the module docstring).
        standardize: z-score each update's scores per class before the EMA.
        prior: float [n] >= 0 or None: base weights the scores refine, w_i proportional to
            prior_i * exp(z_i / tau) within each class (mean 1 per class). An instance with prior 0 keeps
            weight 0 and is left out of the z-scores and ranks; without scores the weights are the prior,
            normalised per class (``iwd_fast.weighting.trust.trust_weights`` gives one). None: uniform.

    The defaults are :data:`WEIGHTER_DEFAULTS`, the ones the built-in loops use.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int, *, temperature: float = WEIGHTER_DEFAULTS["temperature"],
                 ema: float = WEIGHTER_DEFAULTS["ema"], floor: float = WEIGHTER_DEFAULTS["floor"], sign: int = 1,
                 eps: float = 1e-8, transform: str = WEIGHTER_DEFAULTS["transform"],
                 standardize: bool = WEIGHTER_DEFAULTS["standardize"], prior: Optional[torch.Tensor] = None):
        if int(num_classes) < 1:
            raise ValueError(f"InfluenceWeighter: num_classes must be >= 1, got {num_classes}")
        labels = as_labels(labels, "InfluenceWeighter", num_classes).contiguous()
        _check_hparams(sign, ema, eps, "InfluenceWeighter")
        self.labels = labels
        self.num_classes = int(num_classes)
        self.n = int(labels.numel())
        self.ema, self.sign, self.eps = float(ema), int(sign), float(eps)
        self._members = [torch.nonzero(labels == c).flatten() for c in range(self.num_classes)]
        self._fingerprint = labels_fingerprint(labels, self.num_classes)
        self._scores = torch.zeros(self.n, dtype=torch.float64)
        self._scored = torch.zeros(self.n, dtype=torch.bool)
        self._cache: Dict[object, torch.Tensor] = {}  # devices -> weights, "log" -> log-weights
        self.temperature = temperature
        self.floor = floor
        if transform not in TRANSFORMS:
            raise ValueError(f"InfluenceWeighter: transform must be one of {TRANSFORMS}, got {transform!r}")
        self.transform, self.standardize = transform, bool(standardize)
        self._prior: Optional[torch.Tensor] = None
        self.prior = prior

    # ----------------------------------------------------------------------------------- hyperparameters
    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        value = float(value)
        if not value > 0.0:  # also rejects nan
            raise ValueError(f"InfluenceWeighter: temperature must be > 0 (inf allowed), got {value}")
        self._temperature = value
        self._cache = {}

    @property
    def floor(self) -> float:
        return self._floor

    @floor.setter
    def floor(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"InfluenceWeighter: floor must lie in [0, 1], got {value}")
        self._floor = value
        self._cache = {}

    @property
    def prior(self) -> Optional[torch.Tensor]:
        """Base weights float64 [n] the scores refine (None: uniform)."""
        return None if self._prior is None else self._prior.clone()

    @prior.setter
    def prior(self, value: Optional[torch.Tensor]) -> None:
        if value is not None:
            value = torch.as_tensor(value).detach().to("cpu", torch.float64)
            if value.shape != (self.n,):
                raise ValueError(f"InfluenceWeighter: prior must have shape ({self.n},), got {tuple(value.shape)}")
            bad = torch.nonzero(~torch.isfinite(value) | (value < 0)).flatten()
            if bad.numel():
                raise ValueError(f"InfluenceWeighter: prior negative or non-finite at indices "
                                 f"{format_indices(bad.tolist())}")
            empty = [c for c, m in enumerate(self._members) if m.numel() and not bool((value[m] > 0).any())]
            if empty:
                raise ValueError(f"InfluenceWeighter: prior is zero on every instance of classes {format_indices(empty)}")
        self._prior = value
        self._cache = {}

    @property
    def scores(self) -> torch.Tensor:
        """Current EMA scores, float64 [n] (0 where unscored; see :attr:`scored`)."""
        return self._scores.clone()

    @property
    def scored(self) -> torch.Tensor:
        """Bool [n]: which instances have received at least one score."""
        return self._scored.clone()

    @property
    def fingerprint(self) -> dict:
        """``n``, ``num_classes`` and ``labels_sha256`` of the labels these scores belong to."""
        return dict(self._fingerprint)

    # ------------------------------------------------------------------------------------------ updates
    def _check_indices(self, indices: torch.Tensor, where: str) -> torch.Tensor:
        indices = torch.as_tensor(indices)
        if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise ValueError(f"{where}: indices must be an integer tensor [m], got {indices.dtype} "
                             f"{tuple(indices.shape)}")
        indices = indices.detach().to("cpu", torch.int64)
        bad = indices[(indices < 0) | (indices >= self.n)]
        if bad.numel():
            raise ValueError(f"{where}: indices out of range [0, {self.n}): {format_indices(bad.tolist())}")
        return indices

    def update(self, indices: torch.Tensor, scores: torch.Tensor) -> None:
        """Fold new raw scores into the per-instance EMA.

        Args:
            indices: int64 [m], distinct dataset indices.
            scores: float [m], raw scores (larger means "upweight" once multiplied by ``sign``).

        The first score of an instance sets its value; later ones give s <- ema * s_old + (1 - ema) * s_new.
        """
        indices = self._check_indices(indices, "InfluenceWeighter.update")
        scores = torch.as_tensor(scores).detach().to("cpu", torch.float64)
        if scores.shape != indices.shape:
            raise ValueError(f"InfluenceWeighter.update: scores shape {tuple(scores.shape)} does not match "
                             f"indices shape {tuple(indices.shape)}")
        uniq, counts = torch.unique(indices, return_counts=True)
        if bool((counts > 1).any()):
            raise ValueError(f"InfluenceWeighter.update: duplicated indices {format_indices(uniq[counts > 1].tolist())}")
        bad = indices[~torch.isfinite(scores)]
        if bad.numel():
            raise ValueError(f"InfluenceWeighter.update: non-finite scores at indices {format_indices(bad.tolist())}")
        if indices.numel() == 0:
            return
        if self.standardize:
            scores = self._standardized(indices, scores)
        old = self._scores[indices]
        seen = self._scored[indices]
        self._scores[indices] = torch.where(seen, self.ema * old + (1.0 - self.ema) * scores, scores)
        self._scored[indices] = True
        self._cache = {}

    def _standardized(self, indices: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Scores z-scored per class within this update (a class seen once in it gets 0)."""
        out = torch.zeros_like(scores)
        labels = self.labels[indices]
        for c in torch.unique(labels).tolist():
            sel = labels == c
            if int(sel.sum()) > 1:
                s = scores[sel]
                out[sel] = (s - s.mean()) / (s.std(unbiased=False) + self.eps)
        return out

    # ------------------------------------------------------------------------------------------ weights
    def _log_weights(self) -> torch.Tensor:
        """log w, float64 [n]: exact where the float32 weights underflow to 0 (cold temperatures)."""
        if "log" not in self._cache:
            lw = torch.zeros(self.n, dtype=torch.float64)
            base = torch.zeros(self.n, dtype=torch.float64)  # log of the prior normalised to mean 1 per class
            for members in self._members:
                n_c = members.numel()
                if n_c == 0:
                    continue
                lp = torch.zeros(n_c, dtype=torch.float64) if self._prior is None else self._prior[members].log()
                base[members] = math.log(n_c) + torch.log_softmax(lp, dim=0)
                known = self._scored[members] & torch.isfinite(lp)
                if not bool(known.any()):
                    lw[members] = base[members]  # no scores in this class: the prior (uniform without one)
                    continue
                s = self._scores[members]
                z = rank_normal(self.sign * s, known) if self.transform == "rank" else \
                    zscore(self.sign * s, known, self.eps)
                z = torch.zeros_like(z) if math.isinf(self._temperature) else z / self._temperature
                lw[members] = math.log(n_c) + torch.log_softmax(lp + z, dim=0)
            if self._floor:  # mix with the prior's weights (uniform without a prior)
                lw = torch.logaddexp(lw + math.log1p(-self._floor) if self._floor < 1 else torch.full_like(lw, -math.inf),
                                     base + math.log(self._floor))
            self._cache["log"] = lw
        return self._cache["log"]

    def _compute(self) -> torch.Tensor:
        return self._log_weights().exp().to(torch.float32)

    def _cached(self, device: torch.device) -> torch.Tensor:
        if device not in self._cache:
            cpu = self._cache.get(torch.device("cpu"))
            if cpu is None:
                cpu = self._cache[torch.device("cpu")] = self._compute()
            self._cache[device] = cpu.to(device)
        return self._cache[device]

    def relative_batch_weights(self, indices: torch.Tensor,
                               device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        """Weights of a batch divided by the batch's largest, float32 [m] in (0, 1] with max 1.

        What a weighted mean over the batch needs (sum_i w_i x_i / sum_i w_i is unchanged), computed from
        the log-weights, so it stays defined when every weight of the batch underflows in float32.
        """
        if device is None:
            device = indices.device if isinstance(indices, torch.Tensor) else torch.device("cpu")
        idx = self._check_indices(indices, "InfluenceWeighter.relative_batch_weights")
        lw = self._log_weights()[idx]
        if lw.numel() == 0:
            return lw.to(device, torch.float32)
        if not bool(torch.isfinite(lw.max())):
            raise ValueError(f"InfluenceWeighter.relative_batch_weights: every instance of the batch has weight 0 "
                             f"(indices {format_indices(idx.tolist())}); draw batches from the instances with "
                             f"positive weight (IndexedClassSampler(..., support=weights > 0))")
        return (lw - lw.max()).exp().to(device, torch.float32)

    def batch_log_weight_sum(self, indices: torch.Tensor) -> float:
        """log sum_i w_i over a batch (float64; finite even where the float32 weights underflow)."""
        idx = self._check_indices(indices, "InfluenceWeighter.batch_log_weight_sum")
        return float(torch.logsumexp(self._log_weights()[idx], dim=0))

    def weights(self, device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        """Weights float32 [n] (a copy); mean exactly 1 in every class up to rounding. Cached until the next update."""
        return self._cached(torch.device(device) if device is not None else torch.device("cpu")).clone()

    def batch_weights(self, indices: torch.Tensor, device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        """Weights of a batch, float32 [m], on ``device`` (default: the device of ``indices``; pass the device
        of the data they weight when the indices live on the CPU)."""
        if device is None:
            device = indices.device if isinstance(indices, torch.Tensor) else torch.device("cpu")
        device = torch.device(device)
        idx = self._check_indices(indices, "InfluenceWeighter.batch_weights")
        return self._cached(device)[idx.to(device)]

    def normalized_batch_weights(self, indices: torch.Tensor,
                                 labels_of_batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Class-wise normalised batch weights wn_i = w_i / sum_{j in B_c} w_j, float32 [m] (METHOD.md 1).

        Within every class present in the batch the returned weights sum to 1. ``labels_of_batch`` [m]
        (default: the stored labels of ``indices``) must agree with the stored labels.
        """
        w = self.batch_weights(indices)
        idx = self._check_indices(indices, "InfluenceWeighter.normalized_batch_weights")
        stored = self.labels[idx]
        if labels_of_batch is not None:
            lb = torch.as_tensor(labels_of_batch).detach().to("cpu", torch.int64)
            if lb.shape != stored.shape:
                raise ValueError(f"InfluenceWeighter.normalized_batch_weights: labels_of_batch shape "
                                 f"{tuple(lb.shape)} does not match indices shape {tuple(stored.shape)}")
            bad = idx[lb != stored]
            if bad.numel():
                raise ValueError(f"InfluenceWeighter.normalized_batch_weights: labels_of_batch disagree with the "
                                 f"stored labels at indices {format_indices(bad.tolist())}")
        lab = stored.to(w.device)
        sums = torch.zeros(self.num_classes, dtype=w.dtype, device=w.device).index_add_(0, lab, w)
        present = torch.unique(lab)
        empty = present[sums[present] <= 0]
        if empty.numel():
            raise ValueError(f"InfluenceWeighter.normalized_batch_weights: zero total weight in classes "
                             f"{format_indices(empty.tolist())}")
        return w / sums[lab]

    def weight_mass_on(self, mask: torch.Tensor) -> float:
        """Fraction of the total weight carried by the instances in ``mask`` (bool [n])."""
        return weight_mass_on(self._cached(torch.device("cpu")), mask)

    # ------------------------------------------------------------------------------------ persistence
    def hyperparameters(self) -> Dict[str, float]:
        return {"temperature": self._temperature, "ema": self.ema, "floor": self._floor,
                "sign": self.sign, "eps": self.eps, "transform": self.transform, "standardize": self.standardize}

    def state_dict(self) -> dict:
        """Scores float64 [n], scored mask bool [n], the prior (or None), hyperparameters and the labels fingerprint."""
        return {"scores": self._scores.clone(), "scored": self._scored.clone(), "prior": self.prior,
                **self.hyperparameters(), **self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; ValueError if it was saved for different labels."""
        check_fingerprint(state, self._fingerprint, "InfluenceWeighter.load_state_dict")
        scores = torch.as_tensor(state["scores"]).to("cpu", torch.float64)
        scored = torch.as_tensor(state["scored"]).to("cpu", torch.bool)
        if scores.shape != (self.n,) or scored.shape != (self.n,):
            raise ValueError(f"InfluenceWeighter.load_state_dict: scores/scored must have shape ({self.n},), got "
                             f"{tuple(scores.shape)} and {tuple(scored.shape)}")
        sign, ema, eps = int(state["sign"]), float(state["ema"]), float(state["eps"])
        _check_hparams(sign, ema, eps, "InfluenceWeighter.load_state_dict")
        transform = state.get("transform", "zscore")
        if transform not in TRANSFORMS:
            raise ValueError(f"InfluenceWeighter.load_state_dict: unknown transform {transform!r}")
        self.temperature = state["temperature"]
        self.floor = state["floor"]
        self.sign, self.ema, self.eps = sign, ema, eps
        self.transform, self.standardize = transform, bool(state.get("standardize", False))
        self._scores = scores.clone()
        self._scored = scored.clone()
        self.prior = state.get("prior")
        self._cache = {}

    def save(self, path: str) -> None:
        """Write a safetensors file: tensors scores/scored/labels (and prior), hyperparameters and the labels
        fingerprint as metadata (``weighting.weighter_file``)."""
        write_weighter(path, self.hyperparameters(), self._fingerprint, self._scores, self._scored, self.labels,
                       self._prior)

    @classmethod
    def load(cls, path: str, labels: Optional[torch.Tensor] = None) -> "InfluenceWeighter":
        """Read a file written by :meth:`save`.

        With ``labels`` given, refuses (ValueError) a file saved for another dataset; without, uses the
        labels stored in the file.
        """
        saved = read_weighter(path, labels)
        hp = {k: saved[k] for k in ("temperature", "ema", "floor", "eps", "transform", "standardize")}
        obj = cls(saved["labels"], saved["num_classes"], sign=saved["sign"], **hp)
        obj.load_state_dict(saved)
        return obj
