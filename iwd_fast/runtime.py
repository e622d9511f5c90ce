"""How a run executes reproducibly: where (device resolution), with which randomness (named seed
streams), and how long each phase took.

Every random choice of a run draws from its own stream, ``mix_seed(run_seed, Stream.X, *more)``, so
adding a stream or reordering code never shifts another stream's numbers, and two runs with the same
seed (one weighted, one not) share noise, splits, initial images and networks: they are paired.
Nothing is seeded from the clock.
"""
from __future__ import annotations

import contextlib
import enum
import time
from dataclasses import dataclass
from typing import Dict, List, Union

import numpy as np
import torch

__all__ = ["Stream", "TrainingStream", "MethodStreams", "mix_seed", "resolve_device", "PhaseTimer"]


class Stream(enum.IntEnum):
    """The random streams of a distillation run (the values are part of the results: never renumber)."""

    GLOBAL = 0             # torch.manual_seed of the run (anything not given its own stream)
    LABEL_NOISE = 1        # which labels flip, and to what
    HELDOUT_SPLIT = 2      # the stratified held-out split of the validation target
    WARMUP_NETWORK = 3     # initial weights of the warm-up scoring network
    WARMUP_TRAINING = 4    # its shuffling
    INITIAL_IMAGES = 5     # which real images initialise the synthetic set
    EVALUATION = 7         # seeds of the evaluation networks
    REEVALUATION = 8       # ``iwd-fast evaluate`` with a seed other than the run's
    DC_SAMPLER = 11        # gradient matching: real batches
    DC_AUGMENT = 12        # gradient matching: DSA draws
    DC_NETWORKS = 13       # gradient matching: the network of each iteration (with the iteration)
    DM_SAMPLER = 21        # distribution matching: real batches
    DM_AUGMENT = 22        # distribution matching: DSA draws
    DM_NETWORKS = 23       # distribution matching: the network of each iteration (with the iteration)
    HELDOUT_BATCHES = 31   # the held-out batch drawn at each refresh of the validation target
    EXPERT_NETWORK = 41    # trajectory matching: initial weights of expert e (with the expert seed and e)
    EXPERT_TRAINING = 42   # its shuffling and DSA draws (with the expert seed, e and a sub-stream)
    TM_SAMPLER = 43        # trajectory matching: the base sampler (unused by the loop itself)
    TM_AUGMENT = 44        # trajectory matching: DSA draws of the inner unroll
    TM_SCHEDULE = 45       # trajectory matching: expert order, start epochs, synthetic batches
    TM_INITIAL = 46        # trajectory matching: which real images initialise the synthetic set
    IDC_SAMPLER = 51       # IDC: real batches (matching and network updates)
    IDC_AUGMENT = 52       # IDC: augmentation draws
    IDC_NETWORKS = 53      # IDC: the network of each iteration (with the iteration)
    IDC_SUBSAMPLE = 54     # IDC: subsampling of decoded synthetic images above batch_syn_max
    PDD_STAGE = 61         # PDD: the seed of stage k >= 1 (with k; stage 0 runs on the run seed itself)
    PDD_CONDITION = 62     # PDD: training a network on the earlier stages' images (with the stage and the network)


class TrainingStream(enum.IntEnum):
    """Streams of one network's training, derived from that network's own seed."""

    SHUFFLE = 1
    AUGMENT = 2


@dataclass(frozen=True)
class MethodStreams:
    """The streams one distillation method draws from."""

    sampler: Stream
    augment: Stream
    networks: Stream


def mix_seed(*keys: int) -> int:
    """A deterministic 31-bit seed from integer keys (platform independent; keys taken modulo 2**64)."""
    return int(np.random.SeedSequence([int(k) % 2 ** 64 for k in keys]).generate_state(1)[0] >> 1)


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """"auto" or None -> cuda when available, else cpu; anything else goes to ``torch.device``. A name that is
    no device, or a CUDA device this machine lacks, is refused in one line (ValueError)."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"device {device}: {why} (torch {torch.__version__}); use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device}: only {torch.cuda.device_count()} CUDA devices are visible")
    return dev


class PhaseTimer:
    """Wall-clock seconds and call counts per phase ("scoring", "distilling", ...); a phase's seconds
    exclude the phases nested inside it."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}
        self.calls: Dict[str, int] = {}
        self._stack: List[list] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        entry = [name, time.perf_counter(), 0.0]
        self._stack.append(entry)
        try:
            yield
        finally:
            self._stack.pop()
            spent = time.perf_counter() - entry[1]
            self.seconds[name] = self.seconds.get(name, 0.0) + spent - entry[2]
            self.calls[name] = self.calls.get(name, 0) + 1
            if self._stack:
                self._stack[-1][2] += spent
