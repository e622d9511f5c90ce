"""IDC: efficient dataset condensation via multi-formation (Kim et al., ICML 2022), with influence weighting.

- Multi-formation: each stored image [C, H, W] is cut into factor x factor tiles, each tile upsampled
  (bilinear) back to [C, H, W]: ipc stored images per class decode to factor**2 * ipc training images.
  The decode is linear, so gradients reach the stored pixels.
- Per iteration a fresh network; for ``idc.inner_loop`` steps, every class's stored images are updated
  so that the network's gradient on the decoded synthetic batch matches its gradient on a real batch
  of the class (IDC's distance: l1 / mse / cos over the convolution weights), the real and synthetic
  batch sharing one augmentation draw; then the network trains on ``idc.net_images`` real images.
- IWD as in DC (METHOD.md 1): the real loss of the matching step is the weighted mean sum_i wn_i CE_i,
  and the backward the step already runs is captured to score the real batch.

Deviations from the reference, all documented in docs/TRAJECTORY.md: images live in the dataset's
normalised space (so lr_img differs from IDC's pixel-space value by 1 / std^2), the network update uses
the matching augmentation without CutMix, and tiles of a size that does not divide H are padded by
edge replication.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from ..runtime import MethodStreams, Stream, mix_seed
from ..weighting.dropin import select_initial
from .base import build_net
from .gradient_matching import GradientMatching
from .stages import Preparation

__all__ = ["decode_multi", "decoded_set", "mix_initial_images", "idc_distance", "check_idc_config", "IDC", "IDC_METRICS"]

IDC_METRICS = ("l1", "mse", "cos")


def decode_multi(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Uniform multi-formation: images [n, C, H, W] -> [factor**2 * n, C, H, W].

    Output block k = i * factor + j (rows i, columns j) holds tile (i, j) of every image, upsampled
    bilinearly (align_corners=False) to H x W; tile side s = ceil(H / factor) (edge padding when H is not
    a multiple). factor 1 returns ``images`` itself.
    """
    if factor < 1:
        raise ValueError(f"decode_multi: factor must be >= 1, got {factor}")
    if factor == 1:
        return images
    n, c, h, w = images.shape
    sh, sw = math.ceil(h / factor), math.ceil(w / factor)
    x = images
    if sh * factor != h or sw * factor != w:
        x = F.pad(x, (0, sw * factor - w, 0, sh * factor - h), mode="replicate")
    tiles = [x[:, :, i * sh:(i + 1) * sh, j * sw:(j + 1) * sw] for i in range(factor) for j in range(factor)]
    return F.interpolate(torch.cat(tiles), size=(h, w), mode="bilinear", align_corners=False)


def decoded_set(images: torch.Tensor, num_classes: int, factor: int):
    """What a network trains on: stored images [num_classes * n, C, H, W] (class-major) decoded class by
    class -> (images [num_classes * factor**2 * n, C, H, W], labels int64), class-major."""
    n = images.shape[0] // num_classes
    with torch.no_grad():
        parts = [decode_multi(images[c * n:(c + 1) * n].detach(), factor) for c in range(num_classes)]
    labels = torch.arange(num_classes, device=images.device).repeat_interleave(parts[0].shape[0])
    return torch.cat(parts), labels


def mix_initial_images(real: torch.Tensor, factor: int) -> torch.Tensor:
    """IDC's "mix" initialisation: real [factor**2 * n, C, H, W] -> stored images [n, C, H, W], tile
    (i, j) of stored image m being real image (i * factor + j) * n + m downscaled to the tile."""
    k = factor * factor
    if real.shape[0] % k:
        raise ValueError(f"mix_initial_images: need a multiple of {k} real images, got {real.shape[0]}")
    n, (_, c, h, w) = real.shape[0] // k, real.shape
    sh, sw = math.ceil(h / factor), math.ceil(w / factor)
    out = torch.zeros(n, c, sh * factor, sw * factor, dtype=real.dtype, device=real.device)
    for i in range(factor):
        for j in range(factor):
            block = real[(i * factor + j) * n:(i * factor + j + 1) * n]
            out[:, :, i * sh:(i + 1) * sh, j * sw:(j + 1) * sw] = F.interpolate(block, size=(sh, sw), mode="bilinear",
                                                                                align_corners=False)
    return out[:, :, :h, :w].contiguous()


def idc_distance(gw_syn: Sequence[torch.Tensor], gw_real: Sequence[torch.Tensor], metric: str = "l1",
                 match_bias: bool = False, match_fc: bool = False) -> torch.Tensor:
    """IDC's gradient distance summed over the matched parameters: l1 sum|a - b|, mse sum (a - b)^2, or
    cos sum over output units of (1 - cosine). 1-D tensors count only with ``match_bias``, 2-D (the
    linear head) only with ``match_fc``."""
    if metric not in IDC_METRICS:
        raise ValueError(f"idc.metric must be one of {IDC_METRICS}, got {metric!r}")
    total = gw_syn[0].new_zeros(())
    for gs, gr in zip(gw_syn, gw_real):
        if (gs.dim() == 1 and not match_bias) or (gs.dim() == 2 and not match_fc):
            continue
        if metric == "l1":
            total = total + (gs - gr).abs().sum()
        elif metric == "mse":
            total = total + (gs - gr).pow(2).sum()
        else:
            a, b = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
            total = total + (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)).sum()
    return total


def check_idc_config(cfg) -> None:
    """One-line errors for IDC's options (``cfg.idc``)."""
    spec = cfg.idc
    if spec.factor < 1 or spec.inner_loop < 1 or spec.net_images < 0 or spec.batch_syn_max < 1:
        raise ValueError(f"idc: need factor >= 1, inner_loop >= 1, net_images >= 0, batch_syn_max >= 1; got "
                         f"{spec.factor}, {spec.inner_loop}, {spec.net_images}, {spec.batch_syn_max}")
    if spec.metric not in IDC_METRICS:
        raise ValueError(f"idc.metric must be one of {IDC_METRICS}, got {spec.metric!r}")
    if spec.init not in ("mix", "real"):
        raise ValueError(f"idc.init must be 'mix' or 'real', got {spec.init!r}")


class IDC(GradientMatching):
    """One IDC run's state; ``step(it)`` performs one iteration (a fresh network, ``idc.inner_loop`` steps).

    The matching term of a class is DC's (:meth:`GradientMatching._class_term`, IWD included); IDC changes
    what the network sees (the decoded images), the distance, the augmentation and the loop around it.
    With ``frozen`` images (PDD) each class's matched set is the decode of its frozen and its own images, and
    only its own move; ``condition(net, it)``, when set, trains each iteration's fresh network before it is used.
    """

    STREAMS = MethodStreams(Stream.IDC_SAMPLER, Stream.IDC_AUGMENT, Stream.IDC_NETWORKS)
    condition: Optional[Callable[[torch.nn.Module, int], None]] = None
    check_config = staticmethod(check_idc_config)  # config.validate calls it before any work

    @classmethod
    def prepare(cls, ctx) -> Preparation:
        """Stage hook: checks the IDC options; for init "mix" draws factor**2 real images per stored image."""
        cfg, spec, pool = ctx.cfg, ctx.cfg.idc, ctx.pool
        check_idc_config(cfg)
        if spec.init == "real" or spec.factor == 1:
            return Preparation(pool=pool, test=ctx.test)
        k = spec.factor ** 2
        if ctx.initial_indices is not None:  # the run's own choice (random, or by IWD weights after a warm-up)
            chosen = ctx.initial_indices(dataclasses.replace(cfg, ipc=cfg.ipc * k))
        else:
            chosen = {"indices": select_initial(pool.labels.cpu(), None, pool.num_classes, cfg.ipc * k, "random",
                                                mix_seed(cfg.seed, Stream.INITIAL_IMAGES)), "init": "random"}
        idx = chosen["indices"]
        per_class = idx.view(pool.num_classes, k, cfg.ipc)  # class c, tile t, stored image m
        images = torch.cat([mix_initial_images(pool.images[per_class[c].reshape(-1).to(pool.images.device)],
                                               spec.factor) for c in range(pool.num_classes)])
        init = {**chosen, "images": images,
                "init": f"mix: {k} real images per stored image ({chosen['init']}), downscaled into its tiles"}
        return Preparation(pool=pool, test=ctx.test, init=init)

    def __init__(self, cfg, pool, syn, iwd, dsa_strategy, device, timer=None, prepared=None):
        # IDC augments with its own strategy (idc.aug), through the shared draw of Distiller._next_seed /
        # _augment; the run's DSA strategy does not apply (IDC is not a USES_DSA method).
        aug = None if cfg.idc.aug in ("", "none") else cfg.idc.aug
        super().__init__(cfg, pool, syn, iwd, aug, device, timer=timer)
        self.spec = cfg.idc
        per_channel = pool.images.transpose(0, 1).reshape(pool.channels, -1)
        shape = (1, pool.channels, 1, 1)
        self.lo, self.hi = per_channel.min(1).values.view(shape), per_channel.max(1).values.view(shape)
        self.subsample = torch.Generator().manual_seed(mix_seed(cfg.seed, Stream.IDC_SUBSAMPLE))

    def state_dict(self) -> Dict:
        return {**super().state_dict(), "subsample": self.subsample.get_state()}

    def load_state_dict(self, state: Dict) -> None:
        super().load_state_dict(state)
        self.subsample.set_state(state["subsample"])

    # -------------------------------------------------------------------------------- multi-formation
    def _pick(self) -> Optional[torch.Tensor]:
        """Which decoded images of a class enter this step: None (all) or indices [batch_syn_max]."""
        m = self.spec.factor ** 2 * (self.cfg.ipc + (self.frozen.per_class if self.frozen is not None else 0))
        if m <= self.spec.batch_syn_max:
            return None
        return torch.randperm(m, generator=self.subsample)[:self.spec.batch_syn_max].to(self.device)

    def decoded(self, stored: torch.Tensor, pick: Optional[torch.Tensor]) -> torch.Tensor:
        """Decoded images [<= batch_syn_max, C, H, W] of stored images [ipc, C, H, W] (differentiable)."""
        x = decode_multi(stored, self.spec.factor)
        return x if pick is None else x[pick]

    def evaluation_set(self):
        """The decoded set [factor**2 * C * ipc, C, H, W] (class-major) and its labels."""
        return decoded_set(self.syn.images, self.pool.num_classes, self.spec.factor)

    def tensors(self) -> Dict[str, torch.Tensor]:
        images, labels = self.evaluation_set()
        return {"eval_images": images, "eval_targets": labels}

    def summary(self) -> Dict:
        return {"idc_factor": self.spec.factor, "idc_decoded_per_class": self.spec.factor ** 2 * self.cfg.ipc}

    # ------------------------------------------------------------- what IDC changes in DC's matching
    def _synthetic_of_class(self, c: int):
        """Stored images of class c [ipc, C, H, W], their decode (subsampled to batch_syn_max), labels c."""
        pick = self._pick()
        frozen = self.frozen.of_class(c) if self.frozen is not None else None
        n = self.spec.factor ** 2 * (self.cfg.ipc + (0 if frozen is None else frozen.shape[0])) if pick is None \
            else pick.shape[0]
        labels = torch.full((n,), c, dtype=torch.long, device=self.device)
        if frozen is None:
            return self.syn.of_class(c), lambda stored: self.decoded(stored, pick), labels
        return self.syn.of_class(c), lambda stored: self.decoded(torch.cat([frozen, stored]), pick), labels

    def _distance(self, gw_syn, gw_real) -> torch.Tensor:
        return idc_distance(gw_syn, gw_real, self.spec.metric, self.spec.match_bias, self.spec.match_fc)

    # --------------------------------------------------------------------------------------- the loop
    def step(self, it: int) -> Dict[str, float]:
        cfg, pool = self.cfg, self.pool
        net = build_net(cfg.net, pool, mix_seed(cfg.seed, self.STREAMS.networks, it), self.device).train()
        if self.condition is not None:
            self.condition(net, it)
            net.train()
        names = [n for n, _ in net.named_parameters()]
        params = [p for _, p in net.named_parameters()]
        opt_net = torch.optim.SGD(params, lr=self.spec.net_lr, momentum=self.spec.net_momentum,
                                  weight_decay=self.spec.net_weight_decay)
        if self.spec.clamp:
            with torch.no_grad():
                self.syn.images.copy_(torch.maximum(torch.minimum(self.syn.images, self.hi), self.lo))
        total = 0.0
        for step in range(self.spec.inner_loop):
            scoring, val_dir = self._scoring_plan(net, it * self.spec.inner_loop + step, self.spec.net_lr)
            for c in range(pool.num_classes):  # IDC updates the images class by class
                loss = self._class_term(net, names, params, c, scoring, val_dir)
                self.opt_img.zero_grad(set_to_none=True)
                loss.backward()
                self.opt_img.step()
                total += float(loss.detach())
            self._train_net(net, opt_net)
        return {"match_loss": total / (self.spec.inner_loop * pool.num_classes)}

    def _train_net(self, net, opt_net) -> None:
        """One pass over ``idc.net_images`` real images drawn uniformly from the pool, batch batch_real."""
        n_img = min(self.spec.net_images, self.pool.labels.shape[0])
        if n_img == 0:
            return
        pick = torch.randperm(self.pool.labels.shape[0], generator=self.sampler.generator)[:n_img].to(self.device)
        bs = max(1, min(self.cfg.batch_real, n_img))
        for start in range(0, n_img, bs):
            idx = pick[start:start + bs]
            loss = F.cross_entropy(net(self._augment(self.pool.images[idx], self._next_seed())), self.pool.labels[idx])
            opt_net.zero_grad(set_to_none=True)
            loss.backward()
            opt_net.step()
