"""DC and DSA: gradient matching (Zhao et al. 2021; Zhao & Bilen 2021), with influence weighting.

Per iteration a fresh network is drawn; for ``outer_loop`` steps the synthetic images of every class
are updated so that the network's gradient on them matches its gradient on a real batch of the class,
then the network trains ``inner_loop`` epochs on the synthetic set. IWD changes one line: the real
loss is the weighted mean sum_i wn_i CE_i (METHOD.md section 1), and the real backward the loop
already runs is captured to score the batch.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..scoring import capture
from ..weighting.dropin import weighted_cross_entropy
from ..weighting.targets import implicit_direction, matching_direction, scores_from_capture
from ..runtime import MethodStreams, Stream, mix_seed
from .base import PLAIN_REAL_SIDE, SCORED_REAL_SIDE, Distiller, build_net

__all__ = ["layerwise_distance", "GradientMatching"]


def layerwise_distance(gw_syn: Sequence[torch.Tensor], gw_real: Sequence[torch.Tensor]) -> torch.Tensor:
    """DC's matching distance: sum over layers and output units of (1 - cosine); 1-D parameters
    (biases, norm affines) are left out, as in the reference method."""
    total = gw_syn[0].new_zeros(())
    for gs, gr in zip(gw_syn, gw_real):
        if gs.dim() == 1:
            continue
        gs2, gr2 = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
        cos = (gs2 * gr2).sum(-1) / (gs2.norm(dim=-1) * gr2.norm(dim=-1) + 1e-6)
        total = total + (1 - cos).sum()
    return total


class GradientMatching(Distiller):
    """One DC/DSA run's state; ``step(it)`` performs one outer iteration and returns its metrics."""

    STREAMS = MethodStreams(Stream.DC_SAMPLER, Stream.DC_AUGMENT, Stream.DC_NETWORKS)

    def step(self, it: int) -> Dict[str, float]:
        cfg, pool = self.cfg, self.pool
        net = build_net(cfg.net, pool, mix_seed(cfg.seed, self.STREAMS.networks, it), self.device).train()
        names = [n for n, _ in net.named_parameters()]
        params = [p for _, p in net.named_parameters()]
        opt_net = torch.optim.SGD(net.parameters(), lr=cfg.lr_net)
        total = 0.0
        for ol in range(cfg.outer_loop):
            scoring, val_dir = self._scoring_plan(net, it * cfg.outer_loop + ol, cfg.lr_net)
            loss = torch.zeros((), device=self.device)
            for c in range(pool.num_classes):
                loss = loss + self._class_term(net, names, params, c, scoring, val_dir)
            self.opt_img.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_img.step()
            total += float(loss.detach())
            if ol == cfg.outer_loop - 1:
                break
            self._train_net(net, opt_net)
        return {"match_loss": total / (cfg.outer_loop * pool.num_classes)}

    # ------------------------------------------------------------ what a subclass changes (IDC)
    def _distance(self, gw_syn: Sequence[torch.Tensor], gw_real: Sequence[torch.Tensor]) -> torch.Tensor:
        """The matching distance between synthetic and real gradients (DC's layer-wise cosine)."""
        return layerwise_distance(gw_syn, gw_real)

    def _synthetic_of_class(self, c: int) -> Tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
        """(stored, decode, labels): the learnable images of class c [ipc, C, H, W] (a view of the synthetic
        set), the differentiable map from them to the images the network sees, and those images' labels."""
        return self.syn.of_class(c), lambda stored: stored, self.syn.labels[c * self.syn.ipc:(c + 1) * self.syn.ipc]

    # -------------------------------------------------------------------------------- one matching term
    def _scoring_plan(self, net, step_index: int, scale: float) -> Tuple[bool, Optional[List[torch.Tensor]]]:
        """Whether matching step ``step_index`` scores its real batches, and the validation direction it
        streams (None unless the target is "validation"; ``scale`` the network's learning rate)."""
        scoring = self.iwd is not None and self.iwd.due(step_index)
        val_dir = None
        if scoring and self.iwd.target == "validation":
            with self.iwd.timer.phase("scoring"):
                val_dir = self.iwd.validation_direction(net, self.pool, scale=scale)
        return scoring, val_dir

    def _class_term(self, net, names, params, c: int, scoring: bool, val_dir) -> torch.Tensor:
        """The matching distance of class c (graph to the synthetic images); when ``scoring``, the real
        batch's scores are taken from the same backward that gives the (weighted) real gradient."""
        cfg, pool, iwd = self.cfg, self.pool, self.iwd
        idx = self.sampler.sample(c, cfg.batch_real).to(self.device)
        x_real, y_real = pool.images[idx], pool.labels[idx]
        w = iwd.batch_weights(idx, self.device) if iwd is not None else None
        seed = self._next_seed()
        x_real = self._augment(x_real, seed)

        cap = None
        if scoring:  # one backward of the unweighted losses gives the weighted gradient and the scores
            streamed = {n: d for n, d in zip(names, val_dir)} if val_dir is not None else None
            with self.timer.phase(SCORED_REAL_SIDE), capture(net, directions=streamed) as cap:
                losses = F.cross_entropy(net(x_real), y_real, reduction="none")
                gw_real = list(cap.weighted_gradient(losses, w, params))
        else:
            with self.timer.phase(PLAIN_REAL_SIDE):
                loss_real = weighted_cross_entropy(net(x_real), y_real, w, validate=False)
                gw_real = [g.detach() for g in torch.autograd.grad(loss_real, params)]

        stored, decode, y_syn = self._synthetic_of_class(c)

        def syn_grads(s: torch.Tensor) -> List[torch.Tensor]:
            out = net(self._augment(decode(s), seed))
            return list(torch.autograd.grad(F.cross_entropy(out, y_syn), params, create_graph=True))

        gw_syn = syn_grads(stored)
        if not (scoring and iwd.target in ("explicit", "implicit")):
            dist = self._distance(gw_syn, gw_real)
            if scoring:
                with iwd.timer.phase("scoring"):
                    iwd.score_captured(cap, idx, names)
            return dist
        with iwd.timer.phase("scoring"):
            dist, direction = matching_direction(lambda gr: self._distance(gw_syn, gr), gw_real)
            if iwd.target == "implicit":
                u = torch.autograd.grad(dist, stored, retain_graph=True)[0].detach()

                def v_of(s_new: torch.Tensor, create_graph: bool) -> List[torch.Tensor]:
                    gs = syn_grads(s_new)
                    return matching_direction(lambda gr: self._distance(gs, gr), gw_real, create_graph)[1]

                direction = implicit_direction(direction, v_of, stored.detach(), u, cfg.lr_img)
            dots = scores_from_capture(cap, iwd.target, names, direction, iwd.impl)
            iwd.score_influence(dots, idx, direction, gw_real)
        return dist

    def _train_net(self, net, opt_net) -> None:
        """``inner_loop`` epochs of the network on the (detached) synthetic set."""
        cfg, syn = self.cfg, self.syn
        images, labels = syn.images.detach(), syn.labels
        n = images.shape[0]
        bs = min(cfg.batch_train_net, n)
        for _ in range(cfg.inner_loop):
            for start in range(0, n, bs):
                x = self._augment(images[start:start + bs], self._next_seed())
                loss = F.cross_entropy(net(x), labels[start:start + bs])
                opt_net.zero_grad(set_to_none=True)
                loss.backward()
                opt_net.step()
