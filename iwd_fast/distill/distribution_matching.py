"""DM: distribution matching (Zhao & Bilen 2023), with influence weighting.

Per iteration a fresh random network embeds a real batch and the synthetic images of every class; the
synthetic class mean is pulled towards the real class mean. IWD makes the real mean a weighted mean
(METHOD.md section 1). Its explicit score is an embedding dot, s_i = <f(x_i), v> with
v = d||mu_w - mu_syn||^2 / d mu_w: nearly free, and so is DM's own "prototype" target (the margin of
each real embedding towards its labelled class's mean over the iteration's batches; it finds flipped
labels where the explicit score does not). Validation and self targets score the real batch at the
same random network through a captured backward of its classification losses to the layer outputs
(an extra forward/backward on scoring steps).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from ..scoring import capture
from ..weighting.dropin import weighted_class_mean
from ..weighting.targets import implicit_direction, matching_direction, prototype_margin
from ..runtime import MethodStreams, Stream, mix_seed
from .base import Distiller, build_net

__all__ = ["DistributionMatching"]


def mean_distance(real_mean: torch.Tensor, syn_embed: torch.Tensor) -> torch.Tensor:
    """||mu_real - mean(syn_embed)||^2 for real_mean [F], syn_embed [m, F]."""
    return ((real_mean - syn_embed.mean(dim=0)) ** 2).sum()


class DistributionMatching(Distiller):
    """One DM run's state; ``step(it)`` performs one iteration and returns its metrics."""

    STREAMS = MethodStreams(Stream.DM_SAMPLER, Stream.DM_AUGMENT, Stream.DM_NETWORKS)

    def step(self, it: int) -> Dict[str, float]:
        cfg, pool = self.cfg, self.pool
        net = build_net(cfg.net, pool, mix_seed(cfg.seed, self.STREAMS.networks, it), self.device).train()
        for p in net.parameters():
            p.requires_grad_(False)
        scoring = self.iwd is not None and self.iwd.due(it)
        val_dir = None
        if scoring and self.iwd.target == "validation":
            with self.iwd.timer.phase("scoring"), _trainable(net):
                val_dir = self.iwd.validation_direction(net, pool, scale=cfg.lr_net)
        loss = torch.zeros((), device=self.device)
        batches = []  # (indices, real embeddings) of every class: the prototype target scores them together
        for c in range(pool.num_classes):
            loss = loss + self._class_term(net, c, scoring, val_dir, batches)
        if scoring and self.iwd.target == "prototype":
            with self.iwd.timer.phase("scoring"):
                idx = torch.cat([i for i, _ in batches])
                self.iwd.update(idx, prototype_margin(torch.cat([e for _, e in batches]), pool.labels[idx],
                                                      pool.num_classes))
        self.opt_img.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_img.step()
        return {"match_loss": float(loss.detach()) / pool.num_classes}

    def _class_term(self, net, c: int, scoring: bool, val_dir, batches: list) -> torch.Tensor:
        cfg, pool, syn, iwd = self.cfg, self.pool, self.syn, self.iwd
        idx = self.sampler.sample(c, cfg.batch_real).to(self.device)
        w = iwd.batch_weights(idx, self.device) if iwd is not None else None
        seed = self._next_seed()
        x_real = self._augment(pool.images[idx], seed)
        s_c = syn.of_class(c)
        emb_real = net.embed(x_real).detach()
        real_mean = weighted_class_mean(emb_real, w, validate=False)
        emb_syn = net.embed(self._augment(s_c, seed))
        if scoring and iwd.target == "prototype":
            batches.append((idx, emb_real))
        if not scoring or iwd.target == "prototype":
            return mean_distance(real_mean, emb_syn)
        with iwd.timer.phase("scoring"):
            if iwd.target in ("explicit", "implicit"):
                dist, (v,) = matching_direction(lambda t: mean_distance(t[0], emb_syn), [real_mean])
                if iwd.target == "implicit":
                    u = torch.autograd.grad(dist, s_c, retain_graph=True)[0].detach()

                    def v_of(s_new: torch.Tensor, create_graph: bool) -> List[torch.Tensor]:
                        e = net.embed(self._augment(s_new, seed))
                        return matching_direction(lambda t: mean_distance(t[0], e), [real_mean], create_graph)[1]

                    (v,) = implicit_direction([v], v_of, s_c.detach(), u, cfg.lr_img)
                iwd.score_influence(emb_real @ v, idx, [v], [real_mean])
                return dist
            names = [n for n, _ in net.named_parameters()]
            streamed = {n: d for n, d in zip(names, val_dir)} if val_dir is not None else None
            with _trainable(net):
                with capture(net, directions=streamed) as cap:
                    losses = F.cross_entropy(net(x_real), pool.labels[idx], reduction="none")
                    cap.score_backward(losses)
                iwd.score_captured(cap, idx, names)
        return mean_distance(real_mean, emb_syn)


class _trainable:
    """Temporarily make a network's parameters require grad (DM keeps them frozen otherwise)."""

    def __init__(self, net):
        self.params = list(net.parameters())

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(True)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(False)
