"""``python -m conformance``: the pytest-xdist workers it asks for, and their CPU threads."""

from __future__ import annotations

import os

import pytest

from conformance import __main__ as main


@pytest.mark.parametrize(
    ("args", "threads"),
    [
        (["-n", "4", "--dist", "loadgroup"], "4"),
        (["-n8"], "2"),
        (["--numprocesses=16"], "1"),
        (["--numprocesses", "32"], "1"),  # never none
        (["-n", "0"], None),  # no workers: torch's own default
        (["-k", "rope"], None),
    ],
)
def test_each_worker_gets_its_share_of_the_cores(monkeypatch, args, threads) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    main._threads_per_worker(args)
    assert os.environ.get("OMP_NUM_THREADS") == threads


def test_the_callers_thread_count_wins(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    main._threads_per_worker(["-n", "8"])
    assert os.environ["OMP_NUM_THREADS"] == "3"
