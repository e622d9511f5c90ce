"""A small deterministic scoring job run in subprocesses by the resume and torchrun tests.

    python score_worker.py OUT TARGET [--slow SECONDS] [--threads N]

Builds the same ConvNet and dataset every time (seeded), scores it into OUT with chunks of two batches.
``--slow`` makes every item take that long to read, so a test can kill the job mid-run.
"""
import argparse
import time

import torch
from torch.utils.data import Dataset

from iwd_fast.networks import build_network
from iwd_fast.scoring.dataset import score_dataset

N, BATCH = 90, 8


class SlowSet(Dataset):
    def __init__(self, slow: float):
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(N, 1, 8, 8, generator=g)
        self.y = torch.randint(0, 5, (N,), generator=g)
        self.slow = slow

    def __len__(self):
        return N

    def __getitem__(self, i):
        if self.slow:
            time.sleep(self.slow)
        return self.x[i], self.y[i]


def model():
    torch.manual_seed(3)
    return build_network("convnet", 1, 5, (8, 8), width=6, depth=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("target")
    ap.add_argument("--slow", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kwargs = {"validation": list(range(0, N, 9))} if args.target == "validation" else {}
    r = score_dataset(model(), SlowSet(args.slow), args.target, out=args.out, batch_size=BATCH, chunk_batches=2,
                      **kwargs)
    print("checksum", r.checksum, "complete" if r.already_complete else "scored", flush=True)


if __name__ == "__main__":
    main()
