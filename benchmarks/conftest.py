"""Options of the pytest-benchmark timings in this folder (benchmarks never run in the default test command).

    --bench-quick        tiny widths and batches (a CI smoke round of every path)
    --bench-models M..   model keys or prefixes (default: all)
    --bench-k K          number of directions
    --bench-threads N    torch.set_num_threads before anything runs
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness, grad_dot_paths


def pytest_addoption(parser):
    group = parser.getgroup("iwd_fast benchmarks")
    group.addoption("--bench-quick", action="store_true", help="tiny sizes: a smoke round of every path")
    group.addoption("--bench-models", nargs="+", default=["all"], help="model keys or prefixes (default all)")
    group.addoption("--bench-k", type=int, default=1, help="number of directions K (default 1)")
    group.addoption("--bench-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def pytest_configure(config):
    threads = config.getoption("--bench-threads", default=None)
    if threads:
        torch.set_num_threads(threads)
