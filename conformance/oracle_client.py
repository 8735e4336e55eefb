"""Runs the oracle process and caches its results on disk.

A result is stored under ``$CONFORMANCE_CACHE/oracle/<key>.pt`` where the key hashes the
request, the model's files and the versions of everything that computes the reference
(torch, transformers, peft, bitsandbytes, tokenizers, and the GPU model for GPU requests).
``fetch`` runs every missing request of a batch in ONE oracle process, so a session pays
the interpreter + transformers import a couple of times, not once per case.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from conformance import versions, zoo

# Bump when oracle.py changes what it computes, so old results are not reused.
ORACLE_FORMAT = 6
REFERENCE_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "tokenizers")


class OracleError(RuntimeError):
    pass


@functools.cache
def _child_finds_this_package(pythonpath: str | None, cwd: str) -> bool:
    """Whether a child of this interpreter, with ``pythonpath`` and in ``cwd``, imports this very
    ``conformance`` package (looked up, not imported: the lookup runs no package code)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    code = "import importlib.util as u; s = u.find_spec('conformance'); print(s.origin if s else '')"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    origin = done.stdout.strip()
    return bool(origin) and Path(origin).resolve() == Path(__file__).resolve().with_name("__init__.py")


def _child_pythonpath(pythonpath: str | None, cwd: Path) -> str | None:
    """PYTHONPATH for the zoo and oracle children, which run ``python -m conformance.<module>``.

    From a checkout, the checkout comes first: its suite, and the shim beside it, win over
    any installed copy. Installed, the child (this interpreter, this environment) finds the
    package where this process did, and PYTHONPATH stays as it is: site-packages put first
    would shadow the pins a caller put on PYTHONPATH (conformance/offline_legs.sh does).
    Only a package this process reached some other way (a path added at run time) is
    put first.
    """
    if zoo.CHECKOUT is None and _child_finds_this_package(pythonpath, str(cwd)):
        return pythonpath
    return os.pathsep.join(p for p in (str(zoo.PACKAGE_PARENT), pythonpath) if p)


def _child_cwd() -> Path:
    """The checkout's root, or (installed) the cache, never site-packages: a child's working
    directory comes first on its import path."""
    if zoo.CHECKOUT is not None:
        return zoo.CHECKOUT
    cwd = zoo.cache_root()
    cwd.mkdir(parents=True, exist_ok=True)
    return cwd


def _subprocess_env(cwd: Path) -> dict:
    env = dict(os.environ)
    env["CONFORMANCE_ORACLE"] = "1"
    env["UNSLOTH_QWEN_COMPAT_DISABLE"] = "1"  # in case anything imports the shim anyway
    env.setdefault("HF_HUB_OFFLINE", "1")
    pythonpath = _child_pythonpath(env.get("PYTHONPATH"), cwd)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    else:
        env.pop("PYTHONPATH", None)
    return env


def _run(args: list[str], log_name: str) -> float:
    logs = zoo.cache_root() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # The pid: workers start their zoo builds in the same second.
    log = logs / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{log_name}.log"
    cwd = _child_cwd()
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        code = subprocess.call(
            [sys.executable, *args],
            cwd=cwd,
            env=_subprocess_env(cwd),
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    elapsed = time.perf_counter() - start
    if code != 0:
        raise _failure(log, code)
    return elapsed


def _failure(log: Path, code: int) -> OracleError:
    """The error of a child that exited with ``code``: its log's last line, and its tail."""
    tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
    last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
    return OracleError(f"oracle process failed: {last} (exit {code}, full log {log})\n{tail}")


class _OracleProcess:
    """One oracle process (``conformance.oracle --serve``) for this whole process, started on
    the first batch: later batches reuse its imports. A batch that fails is answered like a
    one-shot run's exit code; a process that died is started again for the next batch."""

    _lock = threading.Lock()
    _current: _OracleProcess | None = None

    def __init__(self) -> None:
        logs = zoo.cache_root() / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.log = logs / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-oracle.log"
        cwd = _child_cwd()
        read_end, write_end = os.pipe()
        with open(self.log, "w", encoding="utf-8") as handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "conformance.oracle", "--serve", str(write_end)],
                cwd=cwd,
                env=_subprocess_env(cwd),
                stdin=subprocess.PIPE,
                stdout=handle,
                stderr=subprocess.STDOUT,
                pass_fds=(write_end,),
                text=True,
            )
        os.close(write_end)
        self.replies = os.fdopen(read_end, "r", encoding="utf-8")

    def run(self, jobs_file: Path) -> int:
        try:
            self.process.stdin.write(f"{jobs_file}\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            return self.process.wait() or 1
        answer = self.replies.readline()
        if not answer:  # the process ended (crashed, killed): its log says why
            return self.process.wait() or 1
        return int(answer)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.replies.close()

    @classmethod
    def run_jobs(cls, jobs_file: Path) -> float:
        """Run one job file in this process's oracle; seconds taken. OracleError on failure."""
        with cls._lock:
            if cls._current is None or cls._current.process.poll() is not None:
                cls._current = cls()
                atexit.register(cls._current.close)
            server = cls._current
            start = time.perf_counter()
            code = server.run(jobs_file)
            elapsed = time.perf_counter() - start
        if code != 0:
            raise _failure(server.log, code)
        return elapsed


@contextlib.contextmanager
def exclusive(lock_file: Path, wait: bool = True):
    """Holds ``lock_file`` while the block runs and yields True; with ``wait=False``, yields
    False at once where another process holds it. Shared caches use it (pytest-xdist workers,
    and the stock, shim and mutation runs of a leg, share one): the zoo as a whole, each
    oracle result on its own. Not POSIX: no sharing, always True."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def claim_and_run(items: list, lock_of, done, run) -> float:
    """Run ``run`` once on the items no other process holds (each under its own lock), then
    wait for the items another process holds, running ``run`` on any its holder let go of
    undone (that process failed); the seconds spent waiting.

    One lock per item, not one for the whole cache: pytest-xdist workers (and the stock, shim
    and mutation runs of a leg, which share the cache) work on different items at the same
    time and never on the same one twice. A process waits only after its own run has ended
    and its locks are released, so no two wait on each other."""
    waited = 0.0
    with contextlib.ExitStack() as held:
        mine, theirs = [], []
        for item in items:
            if not held.enter_context(exclusive(lock_of(item), wait=False)):
                theirs.append(item)
            elif not done(item):  # finished by another process before we got its lock
                mine.append(item)
        if mine:
            run(mine)
    for item in theirs:
        start = time.perf_counter()
        with exclusive(lock_of(item)):
            waited += time.perf_counter() - start
            if not done(item):
                run([item])
    return waited


def _zoo_lock(name: str) -> Path:
    directory = zoo.model_dir(zoo.by_name(name))
    directory.parent.mkdir(parents=True, exist_ok=True)
    return directory.with_name(directory.name + ".lock")


def ensure_zoo(names) -> None:
    """Build the missing zoo models among ``names`` in a process that never imports Unsloth,
    each under a lock of its own (``claim_and_run``). Under one lock for the whole zoo, every
    pytest-xdist worker waited 31 s on an H200 while one process built every model; the
    workers now build their ``worker_share`` of the session's models side by side first
    (conftest's ``zoo_models``)."""

    def build(names: list[str]) -> None:
        elapsed = _run(["-m", "conformance.zoo", *names], "zoo")
        print(f"[conformance] built zoo models {names} in {elapsed:.1f}s", file=sys.stderr)

    missing = sorted(n for n in set(names) if not zoo.is_built(zoo.by_name(n)))
    if missing:
        claim_and_run(missing, _zoo_lock, lambda name: zoo.is_built(zoo.by_name(name)), build)


#: Where this process's cases spent their time on references, in seconds: the conftest's
#: timing fixture reads it around each case, so a report splits a case's seconds into the
#: oracle's part and the candidate's.
TIMING = {"compute_s": 0.0, "wait_s": 0.0, "load_s": 0.0}


def worker_share(items: list, key) -> list:
    """This pytest-xdist worker's share of a session's up-front work, references or zoo models
    (all of it without xdist): every ``count``-th distinct item by ``key``, from the worker's
    index on.

    Each worker used to ask for the whole batch at once: the first to arrive took every
    result's lock and computed them all in one process while the others waited on its locks,
    so no case of any worker started before that one process was done. Shared out, the
    workers' oracle processes compute side by side; a case whose reference is another
    worker's waits only for that one (``get`` blocks on its lock), or computes it itself when
    no one holds it yet."""
    distinct = list({key(item): item for item in items}.values())
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if count <= 1 or not worker.startswith("gw") or not worker[2:].isdigit():
        return distinct
    return distinct[int(worker[2:]) % count :: count]


class Oracle:
    def __init__(self) -> None:
        self.root = zoo.cache_root() / "oracle"
        self.root.mkdir(parents=True, exist_ok=True)
        self._env = versions.collect()

    def key(self, request: dict) -> str:
        spec = zoo.by_name(request["model"])
        material = {
            "format": ORACLE_FORMAT,
            "request": request,
            "model_files": zoo.files_hash(spec),
            "versions": {p: self._env.get(p) for p in REFERENCE_PACKAGES},
            "gpu": self._env["gpu"] if request["device"] == "cuda" else "cpu",
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]

    def _path(self, request: dict) -> Path:
        return self.root / f"{request['kind']}-{request['model']}-{self.key(request)}.pt"

    def prepare(self, requests: list[dict]) -> None:
        """Make sure the results for ``requests`` exist, computing the missing ones in one
        process (and waiting for those another process is computing); nothing is loaded."""
        ensure_zoo({r["model"] for r in requests})
        missing = {}
        for request in requests:
            path = self._path(request)
            if not path.is_file():
                missing.setdefault(path, request)
        if missing:
            self._compute_missing(missing)

    def fetch(self, requests: list[dict]) -> list[dict]:
        """Results for ``requests`` (same order), computing the missing ones in one process."""
        self.prepare(requests)
        start = time.perf_counter()
        results = [torch.load(self._path(r), weights_only=True) for r in requests]
        TIMING["load_s"] += time.perf_counter() - start
        return results

    def _compute_missing(self, missing: dict[Path, dict]) -> None:
        """Compute the results no other process is computing, then wait for the ones another
        is (``claim_and_run``, one lock per result)."""
        TIMING["wait_s"] += claim_and_run(
            list(missing.items()),
            lock_of=lambda pair: pair[0].with_suffix(".lock"),
            done=lambda pair: pair[0].is_file(),
            run=self._compute,
        )

    def _compute(self, pairs: list[tuple[Path, dict]]) -> None:
        jobs = [
            {"request": request, "out": str(path), "adapter_out": str(path.with_suffix(".adapter"))}
            for path, request in pairs
        ]
        if jobs:
            jobs_file = self.root / f"jobs-{os.getpid()}-{time.time_ns()}.json"
            jobs_file.write_text(json.dumps(jobs, indent=1), encoding="utf-8")
            if os.name == "posix":
                elapsed = _OracleProcess.run_jobs(jobs_file)
            else:  # no file descriptors to pass: a process per batch
                elapsed = _run(["-m", "conformance.oracle", str(jobs_file)], "oracle")
            jobs_file.unlink(missing_ok=True)
            TIMING["compute_s"] += elapsed
            print(f"[conformance] oracle computed {len(jobs)} references in {elapsed:.1f}s", file=sys.stderr)

    def get(self, request: dict) -> dict:
        return self.fetch([request])[0]
