"""The ``paper`` presets on CIFAR-10: every one validates at IPC 1, 10 and 50 and starts on CIFAR-shaped files
written here in the standard format, and docs/PAPER_PROTOCOL.md states the values the presets hold."""
import dataclasses
import importlib.util
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from iwd_fast.app.distill_job import run_distillation
from iwd_fast.app.presets import preset_config
from iwd_fast.distill.config import validate

PAPER = [("dc", None), ("dsa", None), ("dm", None), ("mtt", None), ("datm", None), ("idc", None), ("pdd", "mtt"),
         ("pdd", "idc")]
DOC = Path(__file__).resolve().parents[2] / "docs" / "PAPER_PROTOCOL.md"


@pytest.mark.parametrize("method,base", PAPER)
def test_every_paper_preset_validates_at_each_ipc(method, base):
    for ipc in (1, 10, 50):
        cfg = preset_config("paper", method, "cifar10", ipc, base=base)
        validate(cfg)
        assert cfg.preset == "paper" and cfg.net.width == 128 and cfg.net.depth == 3 and cfg.net.norm == "instancenorm"


@pytest.fixture(scope="module")
def cifar_files(tmp_path_factory):
    """cifar-10-batches-py with 50 random images per class (5 training batches) and 10 per class to test."""
    root = tmp_path_factory.mktemp("cifar")
    base = root / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(10), 50)
    for i in range(5):  # bytes keys, as in the real (python 2) pickles
        part = labels[i * 100:(i + 1) * 100]
        with open(base / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (100, 3072), dtype=np.uint8), b"labels": part.tolist()}, f)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({b"data": rng.integers(0, 256, (100, 3072), dtype=np.uint8),
                     b"labels": np.tile(np.arange(10), 10).tolist()}, f)
    return root


def started(cfg, buffers):
    """The preset with its counts cut to what one step needs: one iteration per stage; one expert per buffer,
    just long enough for 2 start epochs; 2 unrolled steps; loops, batches, network width and evaluation small.
    Every learning rate, loss, augmentation and switch (ZCA where kornia is installed) is kept."""
    tm = cfg.tm
    stages = cfg.pdd.stages if cfg.method == "pdd" else 1
    start = min(tm.max_start_epoch, 2)
    tm = dataclasses.replace(tm, num_experts=1, train_epochs=start + tm.expert_epochs, score_experts=1,
                             max_start_epoch=start, datm_initial_max_start=min(tm.datm_initial_max_start, start),
                             syn_steps=min(tm.syn_steps, 2), buffer_dir=str(buffers),
                             zca=tm.zca and importlib.util.find_spec("kornia") is not None)
    pdd = dataclasses.replace(cfg.pdd, condition_epochs=1,
                              stage_expert_epochs=start + tm.expert_epochs + 1 if cfg.pdd.stage_expert_epochs else 0)
    return cfg.replace(iterations=stages, outer_loop=min(cfg.outer_loop, 2), inner_loop=min(cfg.inner_loop, 2),
                       batch_real=min(cfg.batch_real, 16), net=dataclasses.replace(cfg.net, width=8),
                       eval=dataclasses.replace(cfg.eval, num_nets=1, epochs=1), tm=tm,
                       idc=dataclasses.replace(cfg.idc, inner_loop=1, net_images=32), pdd=pdd)


@pytest.mark.parametrize("method,base", PAPER)
def test_every_paper_preset_starts_on_cifar_files(cifar_files, tmp_path, method, base):
    """One iteration of each method; PDD its first two stages (stage 2 conditioned on stage 1)."""
    cfg = started(preset_config("paper", method, "cifar10", 10, base=base), tmp_path / "buffers")
    until = 2 if method == "pdd" else None
    out = run_distillation(cfg.replace(data_root=str(cifar_files)), progress=False, evaluate=False, until=until)
    if method == "pdd":
        assert cfg.pdd.stages == 5 and out == {"stopped_at": 2}
    else:
        assert out["synthetic"]["images"].shape == (100, 3, 32, 32)


def _doc_rows():
    """(preset, method, base, ipc, config key, value) for every row of the tables in docs/PAPER_PROTOCOL.md
    that names a config key: | setting | key | reference | source | ours |, under a heading "### method [base]"."""
    rows, method, base = [], None, None
    for line in DOC.read_text().splitlines():
        head = re.match(r"### `(\w+)`(?: on `(\w+)`)?", line)
        if head:
            method, base = head.group(1), head.group(2)
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if method is None or len(cells) != 5 or not cells[1].startswith("`"):
            continue
        key, ours = cells[1].strip("`"), cells[4]
        for ipc_text, value in re.findall(r"(?:IPC (\d+): )?`([^`]+)`", ours):
            rows.append((method, base, [int(ipc_text)] if ipc_text else [1, 10, 50], key, value))
    return rows


def test_the_protocol_document_states_the_presets_values():
    rows = _doc_rows()
    assert len(rows) > 60
    for method, base, ipcs, key, value in rows:
        for ipc in ipcs:
            cfg = preset_config("paper", method, "cifar10", ipc, base=base).to_dict()
            held = cfg
            for part in key.split("."):
                held = held[part]
            assert repr(held) == value or str(held) == value, (method, base, ipc, key, held, value)
