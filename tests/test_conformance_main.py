"""The suite under pytest-xdist: every process it starts gets its share of the CPU cores for
torch's threads (conftest.py), and the report says what they got."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _threads_in_report(tmp_path: Path, **env: str) -> str | None:
    """A session's ``omp_num_threads`` with 3 workers asked for (collection only: pytest-xdist
    starts no worker then, but the controller, whose environment they inherit, is set up)."""
    environ = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "conformance", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-n", "3", "-k", "test_fast_path_taken", "--conformance-report", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**environ, **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads((tmp_path / "conformance.json").read_text(encoding="utf-8"))["omp_num_threads"]


def test_each_worker_gets_its_share_of_the_cores(tmp_path: Path) -> None:
    assert _threads_in_report(tmp_path / "a") == str(max(1, (os.cpu_count() or 1) // 3))


def test_the_callers_thread_count_wins(tmp_path: Path) -> None:
    assert _threads_in_report(tmp_path / "b", OMP_NUM_THREADS="7") == "7"
