"""The benchmark-suite runner and its report: cells, shards, resume, aggregate JSONL, paired statistics."""
import json

import pytest

from iwd_fast.app.bench import parse_shard, run_bench
from iwd_fast.app.bench_spec import expand_cells, load_spec
from iwd_fast.app.distill_job import run_distillation
from iwd_fast.app.report import load_rows, paired, render

SPEC = """
name = "tiny"
preset = "smoke"
methods = ["dc"]
datasets = ["digits"]
ipc = [1]
seeds = [0, 1]
noise = [[0.0, "symmetric"], [0.3, "symmetric"]]

[config]
iterations = 1
iwd = { warmup_steps = 2 }

[variants.unweighted]
weighting = "none"
iwd = { init = "random" }

[variants.static]
weighting = "static"
iwd = { init = "weighted" }
"""


@pytest.fixture()
def spec(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(SPEC)
    return str(path)


def test_cells_expand_in_a_fixed_order_and_bad_specs_are_refused(spec, tmp_path):
    cells = expand_cells(load_spec(spec))
    assert len(cells) == 8 and len({c.key for c in cells}) == 8
    assert [c.key for c in cells] == [c.key for c in expand_cells(load_spec(spec))]
    assert {(c.noise, c.variant) for c in cells} == {(0.0, "unweighted"), (0.0, "static"), (0.3, "unweighted"),
                                                     (0.3, "static")}
    assert all(c.config.iterations == 1 and c.config.iwd.warmup_steps == 2 for c in cells)
    bad = tmp_path / "bad.toml"
    bad.write_text(SPEC.replace('weighting = "static"', 'weighting = "sometimes"'))
    with pytest.raises(ValueError, match="weighting must be one of"):
        expand_cells(load_spec(str(bad)))
    with pytest.raises(ValueError, match="i/n"):
        parse_shard("2")
    with pytest.raises(ValueError, match="0 <= i < n"):
        parse_shard("3/3")


def test_shards_resume_and_one_aggregate(spec, tmp_path):
    out = tmp_path / "suite"
    cells = expand_cells(load_spec(spec))
    # an interrupted cell: one of shard 1's, stopped after its first iteration had been checkpointed
    half = cells[1]
    assert run_distillation(half.config, out_dir=str(out / "cells" / half.key), progress=False, until=0) == \
        {"stopped_at": 0}
    first = run_bench(spec, str(out), jobs=2, threads=1, shard="0/2", progress=False)
    assert first["shard_cells"] == 4 and first["ran"] == 4 and not first["failed"]
    assert len(load_rows(str(out / "results.jsonl"))) == 4
    done = {c.key: (out / "cells" / c.key / "summary.json").stat().st_mtime for c in cells[::2]}
    second = run_bench(spec, str(out), jobs=2, threads=1, progress=False)
    assert second["ran"] == 4 and second["finished"] == 8  # shard 0's cells were skipped
    assert done == {k: (out / "cells" / k / "summary.json").stat().st_mtime for k in done}
    rows = load_rows(str(out / "results.jsonl"))
    assert sorted(r["cell"] for r in rows) == sorted(c.key for c in cells)
    assert all(r["init_accuracy"] is not None and r["accuracy"] is not None for r in rows)
    # a folder holding another suite is refused
    other = tmp_path / "other.toml"
    other.write_text(SPEC.replace("seeds = [0, 1]", "seeds = [0, 2]"))
    with pytest.raises(ValueError, match="holds another suite"):
        run_bench(str(other), str(out), progress=False)

    text = render(rows)
    assert "initial images" in text and "on clean labels" in text and "paired gain over unweighted" in text
    mixed = out / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({**r, "git_sha": f"sha{i}"}) + "\n" for i, r in enumerate(rows)))
    with pytest.raises(ValueError, match="git shas"):
        load_rows(str(mixed))


def test_variants_run_first_on_request(spec, tmp_path):
    out = tmp_path / "suite"
    first = run_bench(spec, str(out), progress=False, variants=["unweighted"])
    assert first["ran"] == 4 and {r["variant"] for r in first["rows"]} == {"unweighted"}
    second = run_bench(spec, str(out), progress=False)
    assert second["ran"] == 4 and second["finished"] == 8
    with pytest.raises(ValueError, match=r"--variants names \['bogus'\]"):
        run_bench(spec, str(out), progress=False, variants=["bogus"])
    with pytest.raises(ValueError, match=r"--seeds names \[7\]"):
        run_bench(spec, str(out), progress=False, seeds=[7])


def test_seeds_run_first_on_request(spec, tmp_path):
    first = run_bench(spec, str(tmp_path / "suite"), progress=False, seeds=[1])
    assert first["ran"] == 4 and {r["seed"] for r in first["rows"]} == {1}


def test_paired_statistics_match_scipy():
    from scipy import stats

    a, b = [0.70, 0.72, 0.69, 0.75, 0.71], [0.66, 0.70, 0.68, 0.70, 0.69]
    out = paired(a, b)
    d = [x - y for x, y in zip(a, b)]
    assert out["mean"] == pytest.approx(sum(d) / 5)
    assert out["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    lo, hi = stats.t.interval(0.95, 4, loc=sum(d) / 5, scale=stats.sem(d))
    assert (out["ci_low"], out["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))


def test_the_committed_specs_expand():
    from pathlib import Path

    for spec in sorted((Path(__file__).resolve().parents[2] / "benchmarks" / "specs").glob("*.toml")):
        cells = expand_cells(load_spec(str(spec)))
        assert cells and len({c.key for c in cells}) == len(cells), spec.name


def test_report_replaces_only_its_section():
    from iwd_fast.app.report import replace_section

    doc = "intro\n<!-- evidence:begin -->\nold\n<!-- evidence:end -->\noutro\n"
    assert replace_section(doc, "evidence", "new table") == "intro\n<!-- evidence:begin -->\nnew table\n<!-- evidence:end -->\noutro\n"
    with pytest.raises(ValueError, match="exactly one"):
        replace_section("no markers", "evidence", "x")


def test_report_header_and_stage_costs_follow_the_method():
    """The header names outer x inner loops only for the methods that have them; runs whose IWD is a stage
    before the loop (trajectory matching's two-pass scheme) get its cost stated under their table."""
    from iwd_fast.app.report import render

    def row(method, variant, seed, timing):
        return {"grid": "g", "method": method, "dataset": "d", "ipc": 10, "noise": 0.3, "noise_kind": "symmetric",
                "budget": "cpu", "variant": variant, "seed": seed, "accuracy": 0.7 + 0.01 * seed,
                "init_accuracy": 0.6, "gain_over_init": 0.1 + 0.01 * seed, "init": "random", "init_flipped_share": 0.3,
                "iterations": 40, "loops": [5, 10], "train_size": 100, "timing_seconds": timing}

    two_pass = {"checkpoint scoring": 9.0, "warm-up scoring": 3.0, "experts": 40.0, "distilling": 600.0}
    rows = [row("mtt", "unweighted", s, {"distilling": 590.0}) for s in (0, 1)] + \
           [row("mtt", "iwd", s, {**two_pass, "checkpoint scoring": 9.0 + 2 * s}) for s in (0, 1)] + \
           [row("dc", "unweighted", s, {"distilling": 50.0}) for s in (0, 1)]
    text = render(rows)
    mtt, dc = text.split("#### MTT")[1], text.split("#### DC")[1].split("#### MTT")[0]
    assert "40 iterations, train" in mtt and "loops" not in mtt.split("\n")[0]
    assert "40 iterations of 5 x 10 loops" in dc
    assert "- iwd: IWD ran before the loop: scoring along expert checkpoints 10 ± 1 s" in mtt
    assert "before the loop" not in dc
