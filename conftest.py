"""Test-session set-up shared by the unit tests and the notebook runs (nbval).

- Notebooks write their figures to a temporary folder (the committed figures/ come from `alignlab run`)
  and share one cold artifact cache per session, so each notebook's time includes what a first-time user
  pays. ALIGNLAB_TEST_CACHE=<dir> reuses a cache across sessions instead.
- Under pytest-xdist each worker (and each notebook kernel) uses one torch thread: two workers with two
  threads each oversubscribe two cores and run about twice as slowly (measured, see DESIGN.md section 5).
- Every notebook's wall time (kernel start + all cells) is recorded in runs/notebook_timings.json and
  printed at the end; a quick-scale notebook over NOTEBOOK_BUDGET_S fails the run.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

NOTEBOOK_BUDGET_S = 90.0
ROOT = Path(__file__).parent

if "ALIGNLAB_TEST_SESSION" not in os.environ:  # the controller; xdist workers inherit what it sets here
    tmp = Path(tempfile.mkdtemp(prefix="alignlab-test-"))
    os.environ["ALIGNLAB_TEST_SESSION"] = str(tmp)
    os.environ["ALIGNLAB_CACHE"] = os.environ.get("ALIGNLAB_TEST_CACHE") or str(tmp / "cache")
    os.environ["ALIGNLAB_FIGURES"] = str(tmp / "figures")
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")

_durations: dict[str, float] = defaultdict(float)
_started = time.time()


def pytest_configure(config):
    workers = getattr(config.option, "numprocesses", None) or 0
    if str(workers) not in ("0", "1") and "ALIGNLAB_THREADS" not in os.environ:
        os.environ["ALIGNLAB_THREADS"] = "1"
        os.environ["OMP_NUM_THREADS"] = "1"
    if os.environ.get("ALIGNLAB_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["ALIGNLAB_THREADS"]))


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _durations[path] += report.duration


def _over_budget() -> dict[str, float]:
    return {nb: s for nb, s in _durations.items() if s > NOTEBOOK_BUDGET_S}


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput") or not _durations:
        return
    out = ROOT / "runs"
    out.mkdir(exist_ok=True)
    record = {"budget_s": NOTEBOOK_BUDGET_S, "suite_wall_s": round(time.time() - _started, 1),
              "threads_per_notebook": os.environ.get("ALIGNLAB_THREADS", "all"),
              "notebooks": {nb: round(s, 1) for nb, s in sorted(_durations.items(), key=lambda kv: -kv[1])}}
    (out / "notebook_timings.json").write_text(json.dumps(record, indent=2) + "\n")
    if _over_budget() and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if hasattr(config, "workerinput") or not _durations:
        return
    tr = terminalreporter
    tr.section("notebook runtimes (quick scale, kernel start + all cells)")
    for nb, s in sorted(_durations.items(), key=lambda kv: -kv[1]):
        flag = "  OVER BUDGET" if s > NOTEBOOK_BUDGET_S else ""
        tr.write_line(f"{s:7.1f} s  {nb}{flag}")
    values = sorted(_durations.values())
    tr.write_line(f"{len(values)} notebooks, median {values[len(values) // 2]:.1f} s, max {values[-1]:.1f} s, "
                  f"budget {NOTEBOOK_BUDGET_S:.0f} s each; suite wall {time.time() - _started:.0f} s "
                  "(runs/notebook_timings.json)")
    if _over_budget():
        tr.write_line(f"FAILED: {len(_over_budget())} notebook(s) over the {NOTEBOOK_BUDGET_S:.0f} s quick budget",
                      red=True, bold=True)
