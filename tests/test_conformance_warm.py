"""The hybrid models' kernel warm-up (conformance/warm_kernels.py) and the order it relies on.

The warm-up itself needs a GPU (Triton kernels); here: which warm-ups a selection starts, how a
case waits for them (and stops waiting), and that the hybrid cases are collected last.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conformance import warm_kernels

ROOT = Path(__file__).resolve().parent.parent

IDS = [
    "conformance/test_forward.py::test_forward_logits[qwen3-plain-FastLanguageModel]",
    "conformance/test_forward.py::test_forward_logits[qwen3_5_moe-plain-FastLanguageModel]",
    "conformance/test_quant4.py::test_nf4_logits[qwen3_next-yarn-FastModel]",
]


def test_the_warm_up_covers_the_selected_hybrid_models_and_their_dtypes() -> None:
    assert warm_kernels.hybrid_models(IDS) == ["qwen3_5_moe-plain", "qwen3_next-yarn"]
    assert warm_kernels.dtypes_needed(IDS, "fp32") == ["fp32", "nf4"]
    assert warm_kernels.dtypes_needed(IDS[:2], "bf16") == ["bf16"]  # no 4-bit case of a hybrid model
    assert warm_kernels.hybrid_models(IDS[:1]) == []


def test_a_selection_without_hybrid_models_starts_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("nothing to warm"))
    assert warm_kernels.start(tmp_path / "warm", IDS[:1], "fp32") == []


def test_start_marks_each_warm_up_pending_before_its_child_runs(tmp_path: Path, monkeypatch) -> None:
    started = []

    class Child:
        pid = 4242

        def __init__(self, command, **kwargs):
            started.append(command)

    monkeypatch.setattr(subprocess, "Popen", Child)
    monkeypatch.setattr("conformance.zoo.transformers_builds", lambda spec: True)
    children = warm_kernels.start(tmp_path / "warm", IDS, "fp32")
    assert len(children) == 2
    assert [c[c.index("--dtype") + 1] for c in started] == ["fp32", "nf4"]
    assert all(c[c.index("--models") + 1] == "qwen3_5_moe-plain,qwen3_next-yarn" for c in started)
    assert (tmp_path / "warm" / "fp32.pending").read_text() == "4242"


def _sleeper(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_a_case_waits_until_the_warm_up_is_done(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(warm_kernels.DIR_ENV, str(tmp_path))
    child = _sleeper(30)
    try:
        (tmp_path / "fp32.pending").write_text(str(child.pid))
        started = time.monotonic()
        writer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import time, pathlib; time.sleep(1.5); pathlib.Path({str(tmp_path / 'fp32.done')!r}).write_text('{{}}')",
            ]
        )
        lines = []
        waited = warm_kernels.wait(lines.append)
        writer.wait()
        assert 1.0 <= waited < 10 and time.monotonic() - started < 10
        assert lines and "fp32" in lines[0]
    finally:
        child.kill()
        child.wait()


def test_a_dead_warm_up_or_the_limit_ends_the_wait(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(warm_kernels.DIR_ENV, str(tmp_path))
    dead = _sleeper(0)
    dead.wait()
    (tmp_path / "fp32.pending").write_text(str(dead.pid))  # ended without writing fp32.done
    assert warm_kernels.wait(lambda line: None) < 1.0

    alive = _sleeper(30)
    try:
        (tmp_path / "nf4.pending").write_text(str(alive.pid))
        monkeypatch.setenv(warm_kernels.WAIT_ENV, "1.5")
        assert 1.5 <= warm_kernels.wait(lambda line: None) < 5
    finally:
        alive.kill()
        alive.wait()


def test_without_a_warm_up_there_is_no_wait(monkeypatch) -> None:
    monkeypatch.delenv(warm_kernels.DIR_ENV, raising=False)
    assert warm_kernels.wait(lambda line: pytest.fail("no wait expected")) == 0.0


def test_the_hybrid_cases_are_collected_last() -> None:
    """pytest-xdist hands out cases in collection order: the hybrid ones come after the rest."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "conformance", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-k", "test_forward_logits or test_nf4_logits"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "CONFORMANCE_ENTRY_POINTS": "FastLanguageModel"},
    )  # fmt: skip
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert len(ids) == 24, done.stdout[-2000:] + done.stderr[-2000:]
    hybrid = [warm_kernels.hybrid_models([nodeid]) != [] for nodeid in ids]
    assert hybrid == sorted(hybrid) and 0 < sum(hybrid) < len(ids)
