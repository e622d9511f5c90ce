"""Shared pieces of the fuzz tier (tests/fuzz): hypothesis settings, the "one clear error" check with the
indices it names, and the tally of generated cases.

Profiles: ``IWD_FUZZ_PROFILE=fuzz`` (default: a few derandomised examples per property, for the fast
tier) or ``fuzz-long`` (random, many examples); ``IWD_FUZZ_EXAMPLES=N`` overrides the count of either.
With ``IWD_FUZZ_RECORD=FILE`` every case and fault is appended to FILE as one JSON line when the process
ends (``benchmarks/bench_fuzz.py`` reads them into benchmarks/results/fuzz.jsonl).
"""
from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import re
from collections import Counter
from typing import Callable, Iterable, Optional, Sequence

from hypothesis import HealthCheck, settings

from iwd_fast.scoring.dispatch import ImplUnavailableError

PROFILE = os.environ.get("IWD_FUZZ_PROFILE", "fuzz")
_COUNTS = {"fuzz": 6, "fuzz-long": 80}
if PROFILE not in _COUNTS:
    raise ValueError(f"IWD_FUZZ_PROFILE must be one of {sorted(_COUNTS)}, got {PROFILE!r}")
EXAMPLES = int(os.environ.get("IWD_FUZZ_EXAMPLES", _COUNTS[PROFILE]))
FUZZ = settings(max_examples=EXAMPLES, derandomize=PROFILE == "fuzz", deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])

# The errors a user may get for bad input: each a one-line message. Anything else (KeyError, TypeError,
# IndexError, a RuntimeError from inside torch, ...) is an internal traceback, which the tier refuses.
CLEAR = (ValueError, FileNotFoundError, ImplUnavailableError)

_TALLY: Counter = Counter()
_EVENTS: list = []


def tally(entry: str, outcome: str) -> None:
    """Count one generated case of ``entry`` ("correct" or "refused")."""
    _TALLY[(entry, outcome)] += 1


def record(event: dict) -> None:
    """Keep one fault-tier event (a kill and what the restart ended with) for the results file."""
    _EVENTS.append(event)


def _flush() -> None:
    path = os.environ.get("IWD_FUZZ_RECORD")
    if not path or (not _TALLY and not _EVENTS):
        return
    with open(path, "a") as fh:
        for (entry, outcome), n in sorted(_TALLY.items()):
            fh.write(json.dumps({"kind": "fuzz", "entry": entry, "outcome": outcome, "cases": n,
                                 "profile": PROFILE, "max_examples": EXAMPLES}) + "\n")
        for event in _EVENTS:
            fh.write(json.dumps({"kind": "fault", **event}) + "\n")


atexit.register(_flush)

_LIST = re.compile(r"(?:indices|positions|entries|rows|classes):?\s+\[([-0-9, ]*?)(?:, \.\.\. \((\d+) more\))?\]")


def named_indices(message: str) -> list:
    """The index lists a message names ("at indices [3, 57]", "[0, 1, ... (12 more)]"): [(shown, more)]."""
    out = []
    for m in _LIST.finditer(message):
        shown = [int(v) for v in m.group(1).split(",") if v.strip()]
        out.append((shown, int(m.group(2) or 0)))
    return out


def assert_names_indices(message: str, expected: Iterable[int]) -> None:
    """The message names exactly ``expected`` (sorted, the first ten shown and the rest counted)."""
    expected = sorted(set(int(i) for i in expected))
    lists = named_indices(message)
    assert lists, f"no index list in {message!r}; expected {expected}"
    want = (expected[:10], max(0, len(expected) - 10))
    assert want in lists, f"{message!r} names {lists}, expected {want}"


def refused(entry: str, call: Callable[[], object], *, indices: Optional[Iterable[int]] = None,
            mentions: Sequence[str] = ()) -> None:
    """``call()`` must raise one clear error (a CLEAR type, one line) naming ``indices`` and every string
    of ``mentions``."""
    try:
        result = call()
    except CLEAR as err:
        message = str(err)
    else:
        raise AssertionError(f"{entry}: accepted bad input (returned {type(result).__name__})")
    check_message(entry, message, indices, mentions)
    tally(entry, "refused")


def check_message(entry: str, message: str, indices=None, mentions: Sequence[str] = ()) -> None:
    assert message and "\n" not in message.strip(), f"{entry}: not one line: {message!r}"
    assert "Traceback" not in message, message
    for text in mentions:
        assert text in message, f"{entry}: {message!r} does not name {text!r}"
    if indices is not None:
        assert_names_indices(message, indices)


def correct(entry: str) -> None:
    """Count a case whose result the test has checked."""
    tally(entry, "correct")


def cli(argv: Sequence[str]):
    """(exit code, stdout, stderr) of ``iwd-fast ARGV`` in this process (argparse's exit counts as a code)."""
    from iwd_fast.app.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as stop:
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def cli_refused(entry: str, argv: Sequence[str], *, mentions: Sequence[str] = (), indices=None) -> str:
    """``iwd-fast ARGV`` exits 2 with one line "iwd-fast CMD: error: ..." naming ``mentions`` / ``indices``."""
    code, _, err = cli(argv)
    line = err.strip()
    assert code == 2, f"{entry}: exit code {code} for {list(argv)}: {line[-400:]!r}"
    assert line.startswith(f"iwd-fast {argv[0]}: error: "), f"{entry}: {line[-400:]!r}"
    check_message(entry, line, indices, mentions)
    tally(entry, "refused")
    return line
