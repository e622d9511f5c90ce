"""Fuzzed command lines: ``iwd-fast distill``, ``score``, ``bench`` (and its TOML specs), ``report``.

Every generated bad input must end the command with exit code 2 and one line "iwd-fast CMD: error: ..."
naming the option, key, file (and line or positions) at fault, with nothing written to the output
folder; generated good input must give the correct result (the cells a spec expands to, the positions
a run skipped, the table a report prints).
"""
import json
import math
import uuid

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from iwd_fast.app.bench_spec import expand_cells, load_spec

from fuzzing import FUZZ, cli, cli_refused, correct, refused

pytestmark = pytest.mark.fuzz

# option -> (strategy of bad values, what the one-line error must name)
DISTILL_BAD = {
    "--ipc": (st.integers(-5, 0), "ipc must be a positive integer"),
    "--noise": (st.sampled_from([1.0, 1.5, -0.1, math.nan, math.inf]), "noise must be a rate"),
    "--temperature": (st.sampled_from([0.0, -1.0, -math.inf, math.nan]), "temperature must be > 0"),
    "--iterations": (st.integers(-9, -1), "iterations >= 0"),
    "--refresh": (st.integers(-3, 0), "refresh must be >= 1"),
    "--floor": (st.sampled_from([1.5, -0.2, math.nan]), "floor must lie in [0, 1]"),
    "--heldout-keep": (st.sampled_from([0.0, 1.5, -0.5, math.nan]), "heldout_keep must lie in (0, 1]"),
    "--train-size": (st.integers(-9, -1), "train_size and test_size must be >= 0"),
    "--warmup-steps": (st.integers(-3, 0), "warmup_steps must be >= 1"),
    "--eval-every": (st.integers(-9, -1), "eval_every must be >= 0"),
    "--device": (st.sampled_from(["cuda:7", "gpu", "cpu:x"] if not torch.cuda.is_available() else ["gpu", "cuda:99"]),
                 "device"),
    "--ipc-too-many": (st.integers(200, 10 ** 6), "every class needs at least"),
}


@FUZZ
@given(option=st.sampled_from(sorted(DISTILL_BAD)), method=st.sampled_from(["dc", "dsa", "dm", "mtt", "datm", "idc"]),
       weighting=st.sampled_from(["none", "iwd", "static"]), data=st.data())
def test_distill_options(tmp_path, option, method, weighting, data):
    values, mention = DISTILL_BAD[option]
    value = data.draw(values)
    flag = "--ipc" if option == "--ipc-too-many" else option
    out = tmp_path / uuid.uuid4().hex
    argv = ["distill", "--method", method, "--preset", "smoke", "--weighting", weighting, "--quiet", "--out", str(out),
            f"{flag}={value}"]
    cli_refused("distill", argv, mentions=[mention])
    assert not out.exists(), "a refused distill wrote its folder"


CONFIG_FAULTS = ["truncated", "unknown_key", "nested_unknown_key", "wrong_type", "nested_wrong_type", "not_a_table"]


@FUZZ
@given(fault=st.sampled_from(CONFIG_FAULTS), method=st.sampled_from(["dc", "dm", "mtt", "idc"]), data=st.data())
def test_distill_config_file(tmp_path, fault, method, data):
    from iwd_fast.app.presets import preset_config

    cfg = preset_config("smoke", method, "digits", 1).to_dict()
    path = tmp_path / f"{uuid.uuid4().hex}.json"
    text = json.dumps(cfg)
    name = None
    if fault == "truncated":
        text = text[: data.draw(st.integers(0, len(text) - 1))]
    elif fault in ("unknown_key", "nested_unknown_key"):
        name = data.draw(st.sampled_from(["speed", "colour", "lr"]))
        (cfg["iwd"] if fault == "nested_unknown_key" else cfg)[name] = 1
        name = f"iwd.{name}" if fault == "nested_unknown_key" else name
        text = json.dumps(cfg)
    elif fault == "wrong_type":
        name = data.draw(st.sampled_from(["iterations", "ipc", "lr_img", "method", "seed"]))
        cfg[name] = data.draw(st.sampled_from(["ten", [1], {"a": 1}, True] if name != "method" else [3, None, [1]]))
        text = json.dumps(cfg)
    elif fault == "nested_wrong_type":
        table, key = data.draw(st.sampled_from([("iwd", "temperature"), ("net", "width"), ("eval", "epochs"),
                                                ("tm", "num_experts"), ("idc", "factor")]))
        cfg[table][key] = data.draw(st.sampled_from(["hot", [2], True]))
        name = f"{table}.{key}"
        text = json.dumps(cfg)
    elif fault == "not_a_table":
        name = data.draw(st.sampled_from(["iwd", "net", "tm"]))
        cfg[name] = data.draw(st.sampled_from([3, "x", [1, 2]]))
        text = json.dumps(cfg)
    path.write_text(text)
    out = tmp_path / uuid.uuid4().hex
    mentions = [f"--config {path}"] + ([name] if name else [])
    if fault == "truncated":
        try:
            json.loads(text)
            assume(False)  # a cut that is still a whole JSON document (cannot happen for an object, kept safe)
        except ValueError:
            pass
    cli_refused("distill", ["distill", "--config", str(path), "--quiet", "--out", str(out)], mentions=mentions)
    assert not out.exists()


SCORE_BAD = {
    "--heldout": (st.sampled_from([0.0, 1.0, -0.1, 1.5, math.nan]), "--heldout is a fraction"),
    "--noise": (st.sampled_from([1.0, -0.2, math.nan]), "--noise is a rate"),
    "--temperature": (st.sampled_from([0.0, -2.0, math.nan]), "--temperature must be > 0"),
    "--scale": (st.sampled_from([0.0, -1.0, math.nan, math.inf]), "--scale must be a finite number > 0"),
    "--batch": (st.integers(-3, 0), "--batch >= 1"),
    "--chunk-batches": (st.integers(-3, 0), "--chunk-batches >= 1"),
    "--epochs": (st.integers(-5, -1), "--epochs >= 0"),
    "--width": (st.integers(-4, 0), "--width must be >= 1"),
    "--threads": (st.integers(-2, 0), "--threads must be >= 1"),
    "--impl": (st.sampled_from(["fast", "gpu", "triton2"]), "--impl must be one of"),
    "--device": (st.sampled_from(["gpu", "cuda:9"] if not torch.cuda.is_available() else ["gpu"]), "--device"),
    "--model": (st.sampled_from(["convnet9", "no_such_module_xyz:make", "json:nothing_here"]), "--model"),
    "--checkpoint": (st.sampled_from(["missing.pt", "garbage.pt"]), "--checkpoint"),
    "--direction": (st.sampled_from(["missing.pt"]), "--direction"),
}


@FUZZ
@given(option=st.sampled_from(sorted(SCORE_BAD)), target=st.sampled_from(["validation", "self"]), data=st.data())
def test_score_options(tmp_path, option, target, data):
    values, mention = SCORE_BAD[option]
    value = data.draw(values)
    if option in ("--checkpoint", "--direction"):
        (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
        value = str(tmp_path / value)
        mention = f"{option} {value}"
    if option == "--direction":
        target = "direction"
    out = tmp_path / uuid.uuid4().hex
    argv = ["score", "--dataset", "digits", "--target", target, "--epochs", "0", "--width", "4", "--quiet",
            "--out", str(out), f"{option}={value}"]
    cli_refused("score", argv, mentions=[mention])
    assert not out.exists(), "a refused score run wrote its folder"


@FUZZ
@given(n=st.integers(12, 40), data=st.data())
def test_score_tensors_file_with_nonfinite_images(tmp_path, n, data):
    """The raw images of a tensors file: NaN / Inf at generated positions are named exactly, before any
    normalisation (which would spread them); under --nonfinite skip exactly those are skipped."""
    g = torch.Generator().manual_seed(n)
    x = torch.rand(n, 1, 8, 8, generator=g)
    rows = sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n - 4)))
    for r in rows:
        x[r, 0, data.draw(st.integers(0, 7)), data.draw(st.integers(0, 7))] = \
            data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    labels = torch.arange(n) % 3
    path = tmp_path / f"{uuid.uuid4().hex}.pt"
    torch.save({"images": x, "labels": labels}, path)
    out = tmp_path / uuid.uuid4().hex
    argv = ["score", "--dataset", str(path), "--epochs", "0", "--width", "4", "--target", "self", "--quiet",
            "--out", str(out)]
    cli_refused("score", argv, indices=rows, mentions=["non-finite images", str(path)])
    assert not out.exists()
    if data.draw(st.booleans()):  # the skip policy: a correct run, with exactly the generated positions left out
        code, stdout, err = cli(argv + ["--nonfinite", "skip"])
        assert code == 0, err[-500:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["nonfinite_positions"] == rows and summary["n_nonfinite"] == len(rows)
        correct("score")


# ------------------------------------------------------------------------------------------------ bench specs

def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, (int, str)):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def toml_text(spec: dict) -> str:
    tables = {k: v for k, v in spec.items() if k in ("config", "variants")}
    lines = [f"{k} = {toml_value(v)}" for k, v in spec.items() if k not in ("config", "variants", "grid")]
    if "config" in tables:
        lines += ["[config]"] + [f"{json.dumps(k)} = {toml_value(v)}" for k, v in tables["config"].items()]
    for name, body in (tables.get("variants") or {}).items():
        lines.append(f"[variants.{json.dumps(name)}]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in body.items()] if isinstance(body, dict) else []
    for grid in spec.get("grid", []):
        lines.append("[[grid]]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in grid.items()]
    return "\n".join(lines) + "\n"


SPEC_FAULTS = ["valid", "grid_type", "list_entry_type", "unknown_top_key", "config_type", "config_range",
               "unknown_config_key", "missing_variant", "no_variants", "syntax", "duplicate_cells", "bad_method",
               "bad_dataset", "bad_preset", "noise_kind", "noise_rate", "grid_without_name"]


@st.composite
def specs(draw):
    spec = {"name": "fz", "preset": "smoke", "methods": draw(st.lists(st.sampled_from(["dc", "dm", "dsa"]), min_size=1,
                                                                        max_size=2, unique=True)),
            "datasets": ["digits"], "ipc": draw(st.lists(st.integers(1, 3), min_size=1, max_size=2, unique=True)),
            "seeds": draw(st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True)),
            "noise": draw(st.lists(st.sampled_from([[0.0, "symmetric"], [0.2, "pairflip"], [0.3, "symmetric"]]),
                                   min_size=1, max_size=2, unique_by=str)),
            "config": {"iterations": draw(st.integers(0, 3))},
            "variants": {"plain": {"weighting": "none"}, "static": {"weighting": "static", "iwd": {"init": "weighted"}}}}
    if draw(st.booleans()):
        spec["grid"] = [{"name": "more", "methods": ["dc"], "config": {"outer_loop": 2}}]
    return spec


@FUZZ
@given(spec=specs(), fault=st.sampled_from(SPEC_FAULTS), data=st.data())
def test_bench_spec(tmp_path, spec, fault, data):
    mention = []
    if fault == "grid_type":
        key = data.draw(st.sampled_from(["methods", "ipc", "seeds", "noise", "datasets", "name", "preset"]))
        spec[key] = data.draw(st.sampled_from([7, True, {"a": 1}] if key in ("name", "preset") else ["dc", 3, {"a": 1}]))
        mention = [f"{key} must be"]
    elif fault == "list_entry_type":
        key = data.draw(st.sampled_from(["methods", "ipc", "seeds", "noise"]))
        spec[key] = spec[key] + [data.draw(st.sampled_from(["x", 1.5, True, [1]] if key != "methods" else [4, True]))]
        mention = [f"{key} must be a list of"]
    elif fault == "unknown_top_key":
        spec["speed"] = 3
        mention = ["unknown top-level keys ['speed']"]
    elif fault == "config_type":
        key, value = data.draw(st.sampled_from([("iterations", "ten"), ("lr_img", True), ("iwd", 3),
                                                ("iwd", {"temperature": "hot"}), ("net", {"width": 2.5})]))
        spec["config"][key] = value
        mention = ["config key"]
    elif fault == "config_range":
        key, value, mention = data.draw(st.sampled_from([("iterations", -1, ["iterations >= 0"]),
                                                         ("batch_real", 0, ["batch_real >= 1"]),
                                                         ("iwd", {"temperature": -1.0}, ["iwd.temperature must be > 0"])]))
        spec["config"][key] = value
    elif fault == "unknown_config_key":
        key, value, name = data.draw(st.sampled_from([("colour", 1, "colour"), ("iwd", {"speed": 2}, "iwd.speed")]))
        spec["config"][key] = value
        mention = [f"unknown config keys: ['{name}']"]
    elif fault == "missing_variant":
        spec.setdefault("grid", []).append({"name": "lost", "variants": ["nowhere"]})
        mention = ["names variants ['nowhere']"]
    elif fault == "no_variants":
        del spec["variants"]
        mention = ["needs a [variants] table"]
    elif fault == "duplicate_cells":
        spec["seeds"] = spec["seeds"] + spec["seeds"][:1]
        mention = ["duplicate cells"]
    elif fault == "bad_method":
        spec["methods"] = spec["methods"] + ["zz"]
        mention = ["unknown method 'zz'"]
    elif fault == "bad_dataset":
        spec["datasets"] = ["imagenet"]
        mention = ["imagenet' is neither a built-in name"]
    elif fault == "bad_preset":
        spec["preset"] = "fast"
        mention = ["unknown preset 'fast'"]
    elif fault == "noise_kind":
        spec["noise"] = [[0.1, "weird"]]
        mention = ["noise_kind must be one of"]
    elif fault == "noise_rate":
        spec["noise"] = [[data.draw(st.sampled_from([1.0, -0.5, 2.0])), "symmetric"]]
        mention = ["noise must be a rate"]
    elif fault == "grid_without_name":
        spec.setdefault("grid", []).append({"methods": ["dm"]})
        mention = ["every [[grid]] needs a name"]
    text = toml_text(spec)
    if fault == "syntax":
        lines = text.splitlines()
        at = data.draw(st.integers(0, len(lines)))
        lines.insert(at, data.draw(st.sampled_from(['name = "unterminated', "= 3", "[variants", "ipc = [1,, 2]",
                                                    "seeds = 1 2"])))
        text = "\n".join(lines) + "\n"
        mention = ["not valid TOML"]
    path = tmp_path / f"{uuid.uuid4().hex}.toml"
    path.write_text(text)
    if fault == "valid":
        cells = expand_cells(load_spec(str(path)))
        extra = spec.get("grid", [])
        per_grid = len(spec["ipc"]) * len(spec["seeds"]) * len(spec["noise"]) * len(spec["variants"])
        assert len(cells) == per_grid * (len(spec["methods"]) + len(extra))
        assert all(c.config.iterations == spec["config"]["iterations"] for c in cells)
        return correct("bench spec")
    out = tmp_path / uuid.uuid4().hex
    cli_refused("bench", ["bench", str(path), "--out", str(out), "--quiet"], mentions=[f"{path}: ", *mention])
    assert not out.exists(), "a refused suite wrote its folder"
    if fault == "syntax":
        refused("load_spec", lambda: load_spec(str(path)), mentions=[str(path), "not valid TOML"])


@FUZZ
@given(option=st.sampled_from(["--jobs", "--threads", "--shard"]), data=st.data())
def test_bench_options(tmp_path, option, data):
    path = tmp_path / "ok.toml"
    path.write_text('name = "ok"\npreset = "smoke"\n[config]\niterations = 0\n[variants.plain]\nweighting = "none"\n')
    value = data.draw(st.integers(-3, 0) if option != "--shard" else st.sampled_from(["2/2", "-1/3", "a/b", "1", "0/0"]))
    out = tmp_path / uuid.uuid4().hex
    mention = {"--shard": "--shard"}.get(option, "--jobs and --threads must be >= 1")
    cli_refused("bench", ["bench", str(path), "--out", str(out), "--quiet", f"{option}={value}"], mentions=[mention])
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ report

def result_row(variant: str, seed: int, acc: float) -> dict:
    return {"grid": "g", "method": "dc", "dataset": "digits", "ipc": 1, "noise": 0.0, "noise_kind": "symmetric",
            "budget": "smoke", "variant": variant, "seed": seed, "accuracy": acc, "init_accuracy": 0.5,
            "gain_over_init": acc - 0.5, "init_flipped_share": 0.0, "git_sha": "abc", "init": "random"}


REPORT_FAULTS = ["valid", "torn_line", "not_object", "missing_keys", "wrong_type", "empty", "blank_lines"]


@FUZZ
@given(seeds=st.integers(1, 4), fault=st.sampled_from(REPORT_FAULTS), data=st.data())
def test_report(tmp_path, seeds, fault, data):
    accs = {s: data.draw(st.floats(0.1, 0.99)) for s in range(seeds)}
    rows = [result_row("unweighted", s, accs[s]) for s in range(seeds)]
    lines = [json.dumps(r) for r in rows]
    at = data.draw(st.integers(0, len(lines) - 1))
    mention = []
    if fault == "torn_line":
        lines[at] = lines[at][: data.draw(st.integers(1, len(lines[at]) - 1))]
        mention = [f"line {at + 1} is not JSON"]
    elif fault == "not_object":
        lines[at] = data.draw(st.sampled_from(["[1, 2]", "3", '"row"', "null"]))
        mention = [f"line {at + 1} is a JSON"]
    elif fault == "missing_keys":
        gone = data.draw(st.sampled_from(["variant", "accuracy", "seed", "grid"]))
        del rows[at][gone]
        lines[at] = json.dumps(rows[at])
        mention = [f"line {at + 1} lacks the keys ['{gone}']" if gone != "grid" else f"line {at + 1} lacks the keys"]
    elif fault == "wrong_type":
        key = data.draw(st.sampled_from(["accuracy", "seed", "noise", "init_accuracy"]))
        rows[at][key] = data.draw(st.sampled_from(["high", [1], True]))
        lines[at] = json.dumps(rows[at])
        mention = [f"line {at + 1}: ['{key}'] must be numbers"]
    elif fault == "empty":
        lines = []
        mention = ["holds no finished cells"]
    elif fault == "blank_lines":
        lines.insert(at, "   ")
    path = tmp_path / f"{uuid.uuid4().hex}.jsonl"
    path.write_text("\n".join(lines) + ("\n" if lines else ""))
    if fault in ("valid", "blank_lines"):
        code, out, err = cli(["report", str(path)])
        assert code == 0, err
        mean = 100 * sum(accs.values()) / seeds
        assert f"{mean:.1f}" in out, out
        return correct("report")
    cli_refused("report", ["report", str(path)], mentions=[str(path), *mention])
