"""The defects the fuzz and fault tiers found, one test each (every one failed before its fix)."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import iwd_fast
from iwd_fast.app.distill_job import run_distillation
from iwd_fast.app.presets import preset_config
from iwd_fast.app.run_folder import FolderLock, RunFolder
from iwd_fast.data.image_folder import ImageFolder
from iwd_fast.data.tensor_file import read_tensor_file
from iwd_fast.distill.config import IWDSpec
from iwd_fast.scoring.losses import cross_entropy_per_sample

from fuzzing import cli

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parents[2]


def one_line_refusal(argv, *texts):
    code, _, err = cli(argv)
    line = err.strip()
    assert code == 2 and "\n" not in line and line.startswith(f"iwd-fast {argv[0]}: error: "), line[-600:]
    for text in texts:
        assert text in line, (text, line)
    return line


# ------------------------------------------------------------------------------- the two defects of the issue

def test_score_names_exactly_the_nonfinite_images_of_a_tensors_file(tmp_path):
    """100 images, NaN in image 3 and Inf in image 57: the raw images are checked, so exactly [3, 57] is named
    (the per-channel normalisation used to spread the NaN over every index); --nonfinite skip skips those two."""
    x = torch.rand(100, 1, 8, 8)
    x[3, 0, 1, 1], x[57, 0, 2, 2] = float("nan"), float("inf")
    torch.save({"images": x, "labels": torch.arange(100) % 10}, tmp_path / "x.pt")
    argv = ["score", "--dataset", str(tmp_path / "x.pt"), "--epochs", "0", "--width", "4", "--quiet",
            "--out", str(tmp_path / "run")]
    line = one_line_refusal(argv, f"non-finite images (NaN or Inf) at indices [3, 57] of {tmp_path / 'x.pt'}; ")
    assert not (tmp_path / "run").exists()
    code, _, err = cli(argv + ["--nonfinite", "skip"])
    assert code == 0, err[-500:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["nonfinite_positions"] == [3, 57] and summary["n_scored"] + summary["n_heldout"] == 98


def test_bench_names_the_file_of_a_malformed_spec(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text('name = "x\nmethods = ["dc"]\n')
    one_line_refusal(["bench", str(spec), "--out", str(tmp_path / "o")], f"{spec}: not valid TOML: ",
                     "(at line 1, column 10)")


# ------------------------------------------------------------------------------- found by the fuzz tier

@pytest.mark.parametrize("line, key", [('ipc = ["ten"]', "ipc must be a list of integers"),
                                       ("noise = [0.1]", "noise must be a list of [rate, kind] pairs"),
                                       ('seeds = "12"', "seeds must be a non-empty list of integers")])
def test_bench_spec_values_of_the_wrong_type_are_named(tmp_path, line, key):
    spec = tmp_path / "spec.toml"
    spec.write_text(f'name = "x"\npreset = "smoke"\n{line}\n[variants.u]\nweighting = "none"\n')
    one_line_refusal(["bench", str(spec), "--out", str(tmp_path / "o")], f"{spec}: top level: {key}")
    assert not (tmp_path / "o").exists()


def test_bench_spec_with_an_unknown_dataset_is_refused_before_any_cell_runs(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text('name = "x"\npreset = "smoke"\ndatasets = ["imagenet"]\n[variants.u]\nweighting = "none"\n')
    one_line_refusal(["bench", str(spec), "--out", str(tmp_path / "o")], f"{spec}: dataset '",  # the file, named
                     "imagenet' is neither a built-in name")
    assert not (tmp_path / "o").exists()


ROW = {"grid": "g", "method": "dc", "dataset": "digits", "ipc": 1, "noise": 0.0, "noise_kind": "symmetric",
       "budget": "smoke", "variant": "u", "seed": 0, "accuracy": 0.5, "init_accuracy": 0.4, "gain_over_init": 0.1,
       "init_flipped_share": 0.0}


@pytest.mark.parametrize("body, named", [(json.dumps(ROW) + '\n{"b": ', "line 2 is not JSON"),
                                         ('{"grid": "g"}\n', "line 1 lacks the keys")])
def test_report_names_the_file_and_line_of_a_bad_row(tmp_path, body, named):
    path = tmp_path / "results.jsonl"
    path.write_text(body)
    one_line_refusal(["report", str(path)], f"{path}: {named}")


@pytest.mark.parametrize("device, named", [("cuda:7", "device cuda:7: "), ("foo", "device 'foo' is not a device")])
def test_distill_refuses_a_device_it_cannot_use_in_one_line(tmp_path, device, named):
    if torch.cuda.is_available() and device.startswith("cuda"):
        pytest.skip("this machine may have that device")
    one_line_refusal(["distill", "--preset", "smoke", "--device", device, "--out", str(tmp_path / "o")], named)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, named", [(["--eval-every=-2"], "eval_every must be >= 0"),
                                         (["--ipc", "1000"], "every class needs at least 1000 (ipc=1000)"),
                                         (["--ipc=0"], "ipc must be a positive integer, got 0")])  # was run at 10
def test_distill_refuses_before_its_folder_is_written(tmp_path, argv, named):
    one_line_refusal(["distill", "--preset", "smoke", "--quiet", "--out", str(tmp_path / "o"), *argv], named)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method, table, key, value, named", [("idc", "idc", "factor", 0, "idc: need factor >= 1"),
                                                              ("mtt", "tm", "expert_lr", 0.0, "tm.expert_lr must be > 0")])
def test_method_options_are_refused_before_the_folder_is_written(tmp_path, method, table, key, value, named):
    cfg = preset_config("smoke", method, "digits", 1).to_dict()
    cfg[table][key] = value
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    one_line_refusal(["distill", "--config", str(tmp_path / "c.json"), "--quiet", "--out", str(tmp_path / "o")], named)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, named", [({"iwd": {"speed": 1}}, "unknown config keys: ['iwd.speed']"),
                                           ({"iterations": "ten"}, "config key iterations must be an integer")])
def test_distill_config_file_keys_and_types_are_named(tmp_path, change, named):
    cfg = preset_config("smoke", "dc", "digits", 1).to_dict()
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    one_line_refusal(["distill", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "o")],
                     f"--config {tmp_path / 'c.json'}: {named}")


@pytest.mark.parametrize("option, named", [("--temperature=0", "--temperature must be > 0"),
                                           ("--scale=nan", "--scale must be a finite number > 0"),
                                           ("--width=0", "--width must be >= 1")])
def test_score_refuses_options_before_its_folder_is_written(tmp_path, option, named):
    out = tmp_path / "o"
    one_line_refusal(["score", "--epochs", "0", "--width", "4", "--quiet", "--out", str(out), option], named)
    assert not out.exists()


@pytest.mark.parametrize("content", [b"", b"hello", "cut"])
def test_tensor_file_that_cannot_be_read_is_named(tmp_path, content):
    path = tmp_path / "d.pt"
    torch.save({"images": torch.rand(4, 1, 3, 3), "labels": torch.arange(4)}, path)
    path.write_bytes(path.read_bytes()[:200] if content == "cut" else content)
    with pytest.raises(ValueError, match=rf"tensor file {path}: cannot read it"):
        read_tensor_file(path)


def test_empty_tensor_file_is_named(tmp_path):
    torch.save({"images": torch.rand(0, 1, 8, 8), "labels": torch.zeros(0, dtype=torch.long)}, tmp_path / "e.pt")
    one_line_refusal(["score", "--dataset", str(tmp_path / "e.pt"), "--out", str(tmp_path / "o")],
                     f"tensor file {tmp_path / 'e.pt'} holds no images")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


@pytest.mark.parametrize("fn", ["grad_dot", "grad_norm_sq"])
@pytest.mark.parametrize("inputs", [torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 4)])
def test_inputs_the_model_cannot_take_are_named(fn, inputs):
    net = mlp()
    v = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    args = (net, inputs, torch.zeros(5, dtype=torch.long)) + ((v,) if fn == "grad_dot" else ())
    with pytest.raises(ValueError, match=rf"{fn}: the model cannot run on inputs {inputs.dtype} \(5, \d\): "):
        getattr(iwd_fast, fn)(*args)


def test_score_dataset_names_inputs_the_model_cannot_take():
    with pytest.raises(ValueError, match=r"score_dataset: the model cannot run on the dataset's inputs"):
        iwd_fast.score_dataset(mlp(), (torch.randn(6, 7, dtype=torch.float64), torch.zeros(6, dtype=torch.long)),
                               "self", progress=False)


def test_labels_that_do_not_fit_the_logits_are_named_and_int32_labels_work():
    net, x = mlp(), torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match=r"labels of shape \(5, 1\) do not fit the model's logits \(5, 3\)"):
        iwd_fast.grad_norm_sq(net, x, y.view(5, 1))
    with pytest.raises(ValueError, match=r"integer class indices or float soft labels, got torch.bool"):
        iwd_fast.grad_norm_sq(net, x, y > 0)
    seq = nn.Sequential(nn.Linear(4, 3)).double()  # a [5, 2, 4] input gives dense logits [5, 2, 3]
    with pytest.raises(ValueError, match=r"takes labels \[5, 3\] \(dense logits\)"):
        iwd_fast.grad_norm_sq(seq, torch.randn(5, 2, 4, dtype=torch.float64), y)
    assert torch.equal(iwd_fast.grad_norm_sq(net, x, y.int(), impl="torch"), iwd_fast.grad_norm_sq(net, x, y, impl="torch"))


def test_score_dataset_names_every_bad_label_by_dataset_position():
    y = torch.tensor([0, 1, 2, 0, 7, 1, -1])
    with pytest.raises(ValueError, match=r"labels outside \[0, 3\) at dataset positions \[4, 6\]"):
        iwd_fast.score_dataset(mlp(), (torch.randn(7, 4, dtype=torch.float64), y), "self", progress=False)
    y = torch.tensor([5, 1, 2, 0, 7, 1, -1])  # the first one too: it used to be named alone, by its probe index
    with pytest.raises(ValueError, match=r"at dataset positions \[0, 4, 6\]"):
        iwd_fast.score_dataset(mlp(), (torch.randn(7, 4, dtype=torch.float64), y), "self", progress=False)


def test_capture_counts_the_bad_sample_weights_it_does_not_show():
    net, x, y = mlp(), torch.randn(14, 4, dtype=torch.float64), torch.arange(14) % 3
    with iwd_fast.capture(net) as cap:
        cross_entropy_per_sample(net(x), y).sum().backward()
    w = torch.ones(14, dtype=torch.float64)
    w[:12] = 0.0
    with pytest.raises(ValueError, match=r"bad indices: \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \.\.\. \(2 more\)\]"):
        cap.grad_dot({"0.weight": torch.ones(6, 4, dtype=torch.float64)}, sample_weights=w)


@pytest.mark.parametrize("size", [None, (4, 4)])
def test_image_folder_refuses_a_damaged_file_when_opened(tmp_path, size):
    (tmp_path / "a").mkdir()
    for i in range(3):
        Image.fromarray(np.full((4, 4), 40 * i, np.uint8), "L").save(tmp_path / "a" / f"{i}.png")
    bad = tmp_path / "a" / "2.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(ValueError, match=rf"ImageFolder: image at position 2 \({bad}\) cannot be read"):
        ImageFolder(tmp_path, size=size)



def test_image_folder_with_a_greyscale_first_image_keeps_the_colour_of_the_others(tmp_path):
    """Found by the long profile: the channels came from the first file's mode alone, so one greyscale image
    first turned every colour image of the folder grey."""
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((4, 3), 200, np.uint8), "L").save(tmp_path / "a" / "0.png")
    colour = np.random.default_rng(0).integers(0, 256, (4, 3, 3), dtype=np.uint8)
    Image.fromarray(colour, "RGB").save(tmp_path / "a" / "1.png")
    ds = ImageFolder(tmp_path)
    assert ds.channels == 3
    assert torch.equal(ds[1][0], torch.from_numpy(colour.astype(np.float32) / 255.0).permute(2, 0, 1))
    assert torch.equal(ds[0][0], torch.full((3, 4, 3), 200 / 255.0))     # the greyscale image, read as RGB
    assert ImageFolder(tmp_path, channels=1).channels == 1  # an explicit choice still wins


# ------------------------------------------------------------------------------- found by the fault tier

def smoke_dc(iterations=4):
    return dataclasses.replace(preset_config("smoke", "dc", "digits", 2), iterations=iterations, weighting="iwd",
                               iwd=IWDSpec(influence="validation", init="random", refresh=1))


def test_a_restart_without_a_checkpoint_logs_each_iteration_once(tiny_splits, tmp_path):
    """Killed before its first checkpoint, a run starts over: the iterations the killed process logged are
    recomputed, not logged a second time."""
    cfg, out = smoke_dc(), str(tmp_path / "run")
    run_distillation(cfg, tiny_splits, out_dir=out, progress=False, evaluate=False, until=3)
    (tmp_path / "run" / "checkpoint.pt").unlink()  # as if killed after logging iteration 3, before any checkpoint
    run_distillation(cfg, tiny_splits, out_dir=out, progress=False, evaluate=False)
    assert [r["iteration"] for r in RunFolder(out).read_log()] == [1, 2, 3, 4]


def test_a_log_line_cut_by_a_kill_is_dropped_on_resume(tiny_splits, tmp_path):
    cfg, out = smoke_dc(), str(tmp_path / "run")
    run_distillation(cfg, tiny_splits, out_dir=out, progress=False, evaluate=False, until=2)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as fh:
        fh.write('{"iteration": 3, "match_lo')  # the process died while appending iteration 3
    run_distillation(cfg, tiny_splits, out_dir=out, progress=False, evaluate=False)
    assert [r["iteration"] for r in RunFolder(out).read_log()] == [1, 2, 3, 4]
    (tmp_path / "run" / "metrics.jsonl").write_text('{"iteration": 1}\n{"iter\n{"iteration": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
        RunFolder(out).read_log()



@pytest.mark.parametrize("lost", ["env.json", "data.json"])
def test_a_run_killed_while_its_folder_was_written_gets_its_records_on_restart(tiny_splits, tmp_path, lost):
    """A kill between the folder's first files left a run without env.json (a bench row then said git "unknown",
    torch and device None) or data.json; the restart writes what is missing."""
    cfg, out = smoke_dc(), str(tmp_path / "run")
    run_distillation(cfg, tiny_splits, out_dir=out, progress=False, evaluate=False, until=1)
    want = json.loads((tmp_path / "run" / lost).read_text())
    (tmp_path / "run" / lost).unlink()
    run_distillation(cfg, tiny_splits, out_dir=out, progress=False, evaluate=False)
    got = json.loads((tmp_path / "run" / lost).read_text())
    if lost == "env.json":
        assert got["git_sha"] == want["git_sha"] and got["torch"] == want["torch"] and got["device"] == want["device"]
    else:
        assert got == want

HOLDER = textwrap.dedent("""
    import sys, time
    from iwd_fast.app.run_folder import FolderLock
    FolderLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(600)
""")


@pytest.fixture()
def holder(tmp_path):
    """A process that claims tmp_path/out and sleeps; killed with SIGKILL at the end of the test."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "out")], stdout=subprocess.PIPE, env=env,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("command", ["distill", "score", "bench"])
def test_a_second_process_on_a_claimed_folder_refuses_naming_the_first(tmp_path, holder, command):
    out = tmp_path / "out"
    spec = tmp_path / "s.toml"
    spec.write_text('name = "x"\npreset = "smoke"\n[config]\niterations = 1\n[variants.u]\nweighting = "none"\n')
    argv = {"distill": ["distill", "--preset", "smoke", "--no-eval", "--quiet", "--out", str(out)],
            "score": ["score", "--epochs", "0", "--width", "4", "--quiet", "--out", str(out)],
            "bench": ["bench", str(spec), "--out", str(out), "--quiet"]}[command]
    one_line_refusal(argv, f"{out} is in use by pid {holder.pid} on host ", "; wait for it to finish")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written beside the claim
    holder.send_signal(signal.SIGKILL)  # the kernel drops a killed process's claim: the folder is free again
    holder.wait()
    with FolderLock(out):
        pass


def test_claims_within_one_process_are_shared(tmp_path):
    a = FolderLock(tmp_path).acquire()
    b = RunFolder(tmp_path).lock()
    a.release()
    del b  # the last claim of this process goes with its RunFolder
    assert (tmp_path / ".lock").read_text() == ""
