"""The reliability battery (issue 10): R1-R10, each a family of fault cases with a figure.

Every case is a test that asserts it held, and also records one row through the `record`
fixture. `make reliability` runs the whole battery (the long cases carry the
`reliability` marker and run only with LDM_RELIABILITY=1) with LDM_RELIABILITY_OUT set;
bench/reliability_report.py then turns the rows into the figures of docs/reliability.md
(held / total per family, with the date and the machine). In the default test run the fast
cases run and assert, and record nothing.
"""

import json
import os
import time
from pathlib import Path

import pytest


class Recorder:
    """Appends one JSON line per case to LDM_RELIABILITY_OUT/<family>.jsonl (no-op when unset)."""

    def __init__(self, out, nodeid):
        self.out, self.nodeid = out, nodeid

    def __call__(self, family: str, case: str, held: bool, detail: str = "", **figures) -> bool:
        """Record `case` of `family` (e.g. "R2", "ema.safetensors truncated"); returns `held` so a test can assert it."""
        if self.out is not None:
            row = {"family": family, "case": case, "held": bool(held), "detail": detail, "test": self.nodeid,
                   "time": time.time(), **figures}
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / f"{family}.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        return held


@pytest.fixture
def record(request):
    out = os.environ.get("LDM_RELIABILITY_OUT")
    return Recorder(Path(out) if out else None, request.node.nodeid)
