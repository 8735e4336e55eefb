"""The oracle's shared result cache (conformance/oracle_client.py): concurrent fetchers compute
different references at the same time and never the same one twice (CPU; the oracle child is
stood in for by a function that writes the result files)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from conformance import oracle_client


@pytest.fixture
def oracle(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("CONFORMANCE_CACHE", str(tmp_path))
    monkeypatch.setattr(oracle_client, "ensure_zoo", lambda names: None)
    monkeypatch.setattr(oracle_client.Oracle, "key", lambda self, request: request["name"])
    computed: list[tuple[str, ...]] = []
    spans: dict[tuple[str, ...], tuple[float, float]] = {}
    started = threading.Event()

    def stand_in_child(self, pairs):  # what conformance.oracle does: one file per request
        if not pairs:
            return
        names = tuple(request["name"] for _, request in pairs)
        computed.append(names)
        begin = time.monotonic()
        started.set()
        time.sleep(0.3)  # long enough for the other fetcher to reach the same results
        for path, request in pairs:
            torch.save({"name": request["name"]}, path)
        spans[names] = (begin, time.monotonic())

    monkeypatch.setattr(oracle_client.Oracle, "_compute", stand_in_child)
    return computed, started, spans


def _request(name: str) -> dict:
    return {"kind": "forward", "model": "qwen2-plain", "name": name}


def test_two_fetchers_share_the_work_and_wait_only_for_what_the_other_computes(oracle) -> None:
    computed, started, spans = oracle
    results = {}

    def fetch(label, names, wait_for=None):
        if wait_for is not None:
            wait_for.wait(5)
        results[label] = oracle_client.Oracle().fetch([_request(n) for n in names])

    first = threading.Thread(target=fetch, args=("first", ["a", "b"]))
    second = threading.Thread(target=fetch, args=("second", ["b", "c"], started))
    first.start()
    second.start()
    first.join(10)
    second.join(10)
    assert [r["name"] for r in results["first"]] == ["a", "b"]
    assert [r["name"] for r in results["second"]] == ["b", "c"]
    # b was computed once (by the first), c by the second while the first still held b.
    assert sorted(computed) == [("a", "b"), ("c",)]
    assert spans[("c",)][0] < spans[("a", "b")][1]  # at the same time: no lock over the whole cache
    assert oracle_client.Oracle().fetch([_request("c")])[0] == {"name": "c"}
    assert len(computed) == 2  # cached: nothing computed again


def test_a_result_whose_holder_failed_is_computed_by_the_waiter(oracle, monkeypatch) -> None:
    computed, _, _ = oracle
    client = oracle_client.Oracle()
    path = client._path(_request("x"))
    # Another process holds x's lock and exits without writing it.
    with oracle_client.exclusive(path.with_suffix(".lock"), wait=False) as held:
        assert held
        done = threading.Event()
        thread = threading.Thread(target=lambda: (client.fetch([_request("x")]), done.set()))
        thread.start()
        assert not done.wait(0.3)  # waiting for the holder, not computing x a second time
    thread.join(10)
    assert done.is_set() and computed == [("x",)]


def test_xdist_workers_share_the_up_front_batch_out_between_them(oracle, monkeypatch) -> None:
    """Each worker prepares its own share of the session's references, side by side; a case
    needing another worker's reference then waits for it, not computing it a second time."""
    computed, _, spans = oracle
    batch = [_request(n) for n in "abcdeb"]  # b twice: one reference, one share
    key = oracle_client.Oracle.key
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert [r["name"] for r in oracle_client.worker_share(batch, lambda r: key(None, r))] == list("abcde")
    shares = {}
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
        shares[worker] = [r["name"] for r in oracle_client.worker_share(batch, lambda r: key(None, r))]
    assert shares == {"gw0": ["a", "c", "e"], "gw1": ["b", "d"]}

    threads = [
        threading.Thread(
            target=lambda names=names: oracle_client.Oracle().prepare([_request(n) for n in names])
        )
        for names in shares.values()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(computed) == [("a", "c", "e"), ("b", "d")]
    (first, second) = (spans[("a", "c", "e")], spans[("b", "d")])
    assert first[0] < second[1] and second[0] < first[1]  # side by side, not one after the other
    assert oracle_client.Oracle().get(_request("d")) == {"name": "d"}
    assert len(computed) == 2


def test_one_oracle_process_serves_every_batch_and_outlives_a_failed_one(monkeypatch, tmp_path: Path) -> None:
    """The real oracle child (CPU): batches after the first reuse its imports; a batch that
    raises is an OracleError with its traceback, and the next batch runs in the same process."""
    from conformance import plan, rope_grid

    monkeypatch.setenv("CONFORMANCE_CACHE", str(tmp_path))
    monkeypatch.setattr(oracle_client._OracleProcess, "_current", None)
    cells = [c for c in rope_grid.cells() if c.spec.family == "qwen2"][:2]
    oracle_client.ensure_zoo({c.spec.name for c in cells})
    client = oracle_client.Oracle()
    first = client.fetch([plan.rope_facts(cells[0], None)])[0]
    process = oracle_client._OracleProcess._current.process
    assert set(first) == {"length_dependent"}
    broken = {**plan.rope_facts(cells[1], None), "kind": "no_such_kind"}
    with pytest.raises(oracle_client.OracleError, match="KeyError: 'no_such_kind'"):
        client.fetch([broken])
    second = client.fetch([plan.rope_facts(cells[1], None)])[0]
    assert set(second) == {"length_dependent"}
    assert oracle_client._OracleProcess._current.process is process and process.poll() is None
    log = oracle_client._OracleProcess._current.log.read_text(encoding="utf-8")
    assert log.count("oracle: jobs") == 3
    oracle_client._OracleProcess._current.close()
    assert process.poll() == 0


def test_workers_build_their_share_of_the_zoo_side_by_side(monkeypatch, tmp_path: Path) -> None:
    """Each worker builds its share of the session's zoo models under a lock per model, side
    by side; asking for every model then waits only for the others' (never builds one twice),
    and a model whose holder let go unbuilt is built by the waiter."""
    from conformance import zoo

    monkeypatch.setenv("CONFORMANCE_CACHE", str(tmp_path))
    builds: list[tuple[str, ...]] = []
    spans: dict[tuple[str, ...], tuple[float, float]] = {}

    def stand_in_build(args, log_name):  # what `python -m conformance.zoo NAME...` leaves
        names = tuple(args[2:])
        builds.append(names)
        begin = time.monotonic()
        time.sleep(0.3)
        for name in names:
            directory = zoo.model_dir(zoo.by_name(name))
            directory.mkdir(parents=True)
            (directory / "COMPLETE").write_text("hash")
        spans[names] = (begin, time.monotonic())
        return time.monotonic() - begin

    monkeypatch.setattr(oracle_client, "_run", stand_in_build)
    names = sorted(spec.name for spec in zoo.ZOO)[:5]

    def worker(index: int) -> None:
        share = names[index::2]  # what worker_share gives gw<index> of 2
        oracle_client.ensure_zoo(share)
        oracle_client.ensure_zoo(names)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(builds) == sorted([tuple(names[0::2]), tuple(names[1::2])])
    (first, second) = spans.values()
    assert first[0] < second[1] and second[0] < first[1]  # side by side
    assert all(zoo.is_built(zoo.by_name(n)) for n in names)

    other = sorted(spec.name for spec in zoo.ZOO)[5]
    with oracle_client.exclusive(oracle_client._zoo_lock(other), wait=False) as held:
        assert held
        done = threading.Event()
        thread = threading.Thread(target=lambda: (oracle_client.ensure_zoo([other]), done.set()))
        thread.start()
        assert not done.wait(0.3)  # waits for the holder
    thread.join(10)
    assert done.is_set() and builds[-1] == (other,)
