"""Fashion-MNIST as a user would have it, distilled through `iwd-fast distill --dataset PATH`, against the
built-in `fashion-mnist` run of the same seed.

    python benchmarks/bench_user_data.py write --data runs/fashion-mnist-user    # PNG folders and a tensors file
    python benchmarks/bench_user_data.py run --data runs/fashion-mnist-user     # 3 sources x {none, auto}, DC
    python benchmarks/bench_user_data.py --table                                # the table of the stored rows
    python benchmarks/bench_user_data.py --table --into benchmarks/RESULTS.md    # RESULTS.md section 10

``write`` puts the idx files' images into ``DATA/train/<k>_<class>/<index>.png`` and ``DATA/test/...`` (class
folders numbered so that their sorted order is the built-in label order; file names the image's position in
the idx file) and all of them into ``DATA/fashion-mnist.npz`` (uint8 images, labels, test arrays, class names).
``run`` distils each source (the built-in name, the folder with ``--test``, the tensors file; ORDER) with DC at the
cpu preset (IPC 10, seed 0, a 10,000-image training subset, 2,000 test images), with and without IWD
(``--weighting auto``), one at a time on ``--threads`` torch threads, through the command line's own entry
point; one JSON line per finished run goes to benchmarks/results/user_data.jsonl, with a hash of the synthetic images
(equal hashes: bitwise the same synthetic set) and the environment (git sha).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's iwd_fast, whatever is installed
from harness import append_jsonl, environment, markdown_table, read_jsonl, results_path, write_section  # noqa: E402

RESULTS = "user_data"
SECTION = "user-data"
IDX_ROOT = Path("/usr/share/datasets/fashion-mnist")


def write(data: Path) -> None:
    """The PNG folders and the tensors file (module docstring), from the idx files the built-in loader reads."""
    from PIL import Image

    from iwd_fast.data.loaders import _FASHION_CLASSES, read_idx

    folders = [f"{k}_{name.replace('/', '_').replace(' ', '_')}" for k, name in enumerate(_FASHION_CLASSES)]
    arrays = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(IDX_ROOT / f"{prefix}-images-idx3-ubyte.gz")
        y = read_idx(IDX_ROOT / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        arrays[part] = (x, y)
        for folder in folders:
            (data / part / folder).mkdir(parents=True, exist_ok=True)
        for i, (img, lab) in enumerate(zip(x, y)):
            Image.fromarray(img).save(data / part / folders[lab] / f"{i:05d}.png")
    np.savez(data / "fashion-mnist.npz", images=arrays["train"][0], labels=arrays["train"][1],
             test_images=arrays["test"][0], test_labels=arrays["test"][1], class_names=np.array(_FASHION_CLASSES))
    print(f"wrote {len(arrays['train'][1])} + {len(arrays['test'][1])} PNG files under {data}/train, {data}/test "
          f"and {data / 'fashion-mnist.npz'}")


SOURCES = {"built-in": lambda d: ["--dataset", "fashion-mnist"],
           "PNG folder": lambda d: ["--dataset", str(d / "train"), "--test", str(d / "test")],
           "tensors file": lambda d: ["--dataset", str(d / "fashion-mnist.npz")]}


# The order of the runs: the folder against the built-in name first (with and without IWD), the tensors file last.
ORDER = [("built-in", "none"), ("PNG folder", "none"), ("built-in", "auto"), ("PNG folder", "auto"),
         ("tensors file", "none"), ("tensors file", "auto")]


def run(data: Path, runs: Path, seed: int, path: Path) -> List[Dict[str, Any]]:
    """Every run of ORDER, one at a time; each row is appended to ``path`` as soon as its run has finished."""
    from safetensors.torch import load_file

    from iwd_fast.app.cli import main as cli

    rows = []
    env = environment(torch.device("cpu"))  # before the runs: the commit that runs them
    for source, weighting in ORDER:
        args = SOURCES[source]
        out = runs / f"{source.replace(' ', '-')}_{weighting}_s{seed}"
        started = time.perf_counter()
        code = cli(["distill", "--method", "dc", "--ipc", "10", "--preset", "cpu", "--seed", str(seed),
                    "--train-size", "10000", "--weighting", weighting, "--out", str(out), "--quiet", *args(data)])
        if code != 0:
            raise SystemExit(f"{source} {weighting}: iwd-fast distill failed ({code})")
        s = json.loads((out / "summary.json").read_text())
        images = load_file(str(out / "synthetic.safetensors"))["images"]
        record = json.loads((out / "data.json").read_text())
        rows.append({"source": source, "weighting": weighting, "seed": seed, "method": "dc", "ipc": 10,
                     "preset": "cpu", "init_accuracy": s["init_accuracy"]["mean"], "accuracy": s["accuracy"]["mean"],
                     "accs": s["accuracy"]["accs"], "init_accs": s["init_accuracy"]["accs"],
                     "gain_over_init": s["gain_over_init"], "noise_estimate": s.get("noise_estimate"),
                     "synthetic_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest()[:16],
                     "data_fingerprint": record["fingerprint"], "mean": record["mean"], "std": record["std"],
                     "train_images": record["train_images"], "test_images": record["test_images"],
                     "wall_seconds": time.perf_counter() - started, "config": s["config"], "env": env})
        append_jsonl(path, rows[-1:])
    return rows


def table(rows: List[Dict[str, Any]]) -> str:
    """The rows of the latest commit that ran this benchmark, one line each (a table never mixes commits)."""
    sha = rows[-1]["env"]["git_sha"]
    rows = [r for r in rows if r["env"]["git_sha"] == sha]
    body = [[r["source"], r["weighting"], f"{100 * r['init_accuracy']:.2f}", f"{100 * r['accuracy']:.2f}",
             f"{100 * r['gain_over_init']:+.2f}", r["synthetic_sha256"], r["data_fingerprint"],
             f"{r['wall_seconds']:.0f}"] for r in rows]
    head = (f"Rows from git {sha[:7]}: DC, `cpu` preset, Fashion-MNIST IPC 10, seed {rows[0]['seed']}, "
            f"{rows[0]['train_images']} training and {rows[0]['test_images']} test images, 5 evaluation networks; "
            f"`python benchmarks/bench_user_data.py run --data DATA` (CPU budget; seconds on a shared 2-core machine).")
    return head + "\n\n" + markdown_table(["source", "weighting", "initial images %", "distilled %", "gain (pp)",
                                          "synthetic set (sha256)", "data (fingerprint)", "seconds"], body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", choices=("write", "run"))
    p.add_argument("--data", default="runs/fashion-mnist-user", help="where the user-style copies live")
    p.add_argument("--runs", default="runs/user_data", help="run folders (a finished run is not repeated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true", help="print the table of the stored rows and exit")
    p.add_argument("--into", default=None, help="with --table: replace the user-data section of this markdown file")
    args = p.parse_args()
    path = results_path(RESULTS)
    if args.table:
        text = table(read_jsonl(path))
        if args.into:
            write_section(args.into, SECTION, text)
        print(text)
        return
    if args.command == "write":
        write(Path(args.data))
        return
    if args.command != "run":
        p.error("give write, run or --table")
    torch.set_num_threads(args.threads)
    print(table(run(Path(args.data), Path(args.runs), args.seed, path)))


if __name__ == "__main__":
    main()
