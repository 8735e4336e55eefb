"""Running the plan: one worker process per case, on one card or several at once."""

from __future__ import annotations

import functools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .checkpoints import checkpoint_dir, checkpoint_ready
from .planning import Case, Settings, case_settings
from .report import gib, longest_text
from .workload import SHAPES

#: The worker, started by file so that it can hide Unsloth before this package (whose
#: ``__init__`` imports Unsloth) is imported: ``-m unsloth_qwen_compat.bench.worker`` cannot.
WORKER_FILE = Path(__file__).with_name("worker.py")
#: The directory that holds this package.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def worker_command(spec_path: Path) -> list[str]:
    # runpy runs the worker file as __main__ without importing this package first.
    boot = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    return [sys.executable, "-c", boot, str(WORKER_FILE), str(spec_path)]


def worker_env(path: str, device: str, gpu: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")  # the checkpoint is local: no hub look-ups
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Unsloth turns expandable segments on when it is imported; give every path the same
    # allocator so peak memory and the longest sequence compare like with like.
    if not any(k in env for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")):
        env["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"
    if path == "unsloth":
        env["UNSLOTH_QWEN_COMPAT_DISABLE"] = "1"
    else:
        env.pop("UNSLOTH_QWEN_COMPAT_DISABLE", None)
    if path == "shim":
        # The bench is where opt-in speed patches get measured: the shim path runs them
        # (an explicit "0" in the caller's environment still turns one off).
        from ..patches import all_patches

        for patch in all_patches():
            if patch.opt_in_env:
                env.setdefault(patch.opt_in_env, "1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:400] if lines else ""


def run_worker(
    spec: dict[str, Any], work: Path, log: Path, timeout: float, gpu: str | None = None
) -> dict[str, Any]:
    """Run one worker process on ``spec`` (on CUDA device ``gpu`` if given); its result, or a
    failed result that says why."""
    work.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    spec_path = work / f"{spec['id']}.spec.json"
    result_path = work / f"{spec['id']}.result.json"
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}, indent=1))
    with log.open("w") as handle:
        try:
            done = subprocess.run(
                worker_command(spec_path),
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=worker_env(spec["path"], spec["device"], gpu),
                cwd=work,  # Unsloth writes its compiled cache here; the cases of a run share it
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"timed out after {timeout:.0f} s (killed)"}
    if not result_path.is_file():
        why = last_line(log.read_text(errors="replace")) or "no output"
        return {"status": "failed", "error": f"worker exited {done.returncode} without a result: {why}"}
    result = json.loads(result_path.read_text())
    if done.returncode != 0 and result.get("status") == "ok":
        result.update(status="failed", error=f"worker exited {done.returncode} after writing its result")
    return result


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_on_cards(gpus: Sequence[str], tasks: Sequence[Callable[[str | None], None]]) -> None:
    """Run each ``task(gpu)`` on a free card of ``gpus``, as many at once as there are cards;
    without ``gpus``, one after another on the GPU this process sees (``gpu`` None)."""
    if len(gpus) < 2:
        for task in tasks:
            task(gpus[0] if gpus else None)
        return
    free: queue.Queue[str] = queue.Queue()
    for gpu in gpus:
        free.put(gpu)

    def on_a_free_card(task: Callable[[str | None], None]) -> None:
        gpu = free.get()
        try:
            task(gpu)
        finally:
            free.put(gpu)

    with ThreadPoolExecutor(max_workers=len(gpus)) as pool:
        for future in [pool.submit(on_a_free_card, task) for task in tasks]:
            future.result()


def _work_dir(out: Path, gpu: str | None) -> Path:
    # Unsloth writes its compiled cache in the worker's directory: one per card, so
    # processes running at once never write the same files.
    return out / "work" if gpu is None else out / "work" / f"gpu{gpu}"


def prepare_checkpoints(
    shapes: Iterable[str], cache_dir: Path, out: Path, settings: Settings
) -> dict[str, tuple[Path, str | None]]:
    """Build each shape's checkpoint once (its own process); shape -> (directory, error or None)."""
    ready: dict[str, tuple[Path, str | None]] = {}

    def build(name: str, directory: Path, gpu: str | None) -> None:
        progress(f"checkpoint {name}: building random weights (bf16) in {directory}")
        started = time.perf_counter()
        spec = {
            "id": f"prepare-{name}",
            "mode": "prepare",
            "path": "hf",  # built by stock transformers, in a process without Unsloth
            "shape": name,
            "checkpoint": str(directory),
            "device": settings.device,
            "seed": settings.seed,
        }
        log = out / "logs" / f"prepare-{name}.log"
        result = run_worker(spec, _work_dir(out, gpu), log, settings.case_timeout, gpu)
        error = None if result.get("status") == "ok" and checkpoint_ready(directory) else result.get("error")
        ready[name] = (directory, error and f"checkpoint not built: {error}")
        progress(
            f"checkpoint {name}: {'built' if error is None else 'FAILED: ' + str(error)} "
            f"in {time.perf_counter() - started:.1f} s"
        )

    tasks = []
    for name in dict.fromkeys(shapes):
        directory = checkpoint_dir(SHAPES[name], cache_dir)
        if checkpoint_ready(directory):
            ready[name] = (directory, None)
        else:
            tasks.append(functools.partial(build, name, directory))
    _run_on_cards(settings.gpus, tasks)
    return ready


def case_spec(case: Case, settings: Settings, checkpoint: Path) -> dict[str, Any]:
    return {
        **asdict(case),
        "id": case.id,
        "checkpoint": str(checkpoint),
        "device": settings.device,
        "seed": settings.seed,
        **case_settings(case, settings),
    }


def card_groups(cases: Sequence[Case]) -> list[list[Case]]:
    """Cases that must share a card, in order: a table row's runs (shape and precision), or
    one bisection (its own process, its own card)."""
    groups: dict[Any, list[Case]] = {}
    for case in cases:
        key = case.id if case.mode == "bisect" else (case.shape, case.precision)
        groups.setdefault(key, []).append(case)
    return list(groups.values())


def run_cases(
    cases: Sequence[Case],
    settings: Settings,
    out: Path,
    cache_dir: Path,
    on_result: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every case, one process each; a failure is recorded and the run goes on.

    With ``settings.gpus`` the groups of :func:`card_groups` run at once, one per card.
    ``on_result`` gets the results so far (in plan order) after every case.
    """
    checkpoints = prepare_checkpoints((c.shape for c in cases), cache_dir, out, settings)
    number = {case.id: n for n, case in enumerate(cases, 1)}
    done: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def run_group(group: Sequence[Case], gpu: str | None) -> None:
        for case in group:
            card = "" if gpu is None else f" (GPU {gpu})"
            tag = f"[{number[case.id]}/{len(cases)}] {case.describe()}{card}"
            directory, error = checkpoints[case.shape]
            progress(f"{tag}: started")
            started = time.perf_counter()
            if error is not None:
                outcome: dict[str, Any] = {"status": "failed", "error": error}
            else:
                log = out / "logs" / f"{case.id}.log"
                spec = case_spec(case, settings, directory)
                outcome = run_worker(spec, _work_dir(out, gpu), log, settings.case_timeout, gpu)
                outcome["log"] = str(log)
            seconds = time.perf_counter() - started
            result = {**asdict(case), "id": case.id, **case_settings(case, settings), **outcome}
            result["seconds"] = round(seconds, 1)
            if gpu is not None:
                result["gpu"] = gpu
            progress(f"{tag}: {_outcome_words(result)} in {seconds:.1f} s")
            with lock:
                done[case.id] = result
                if on_result is not None:
                    on_result([done[c.id] for c in cases if c.id in done])

    _run_on_cards(settings.gpus, [functools.partial(run_group, group) for group in card_groups(cases)])
    return [done[c.id] for c in cases]


def _outcome_words(result: Mapping[str, Any]) -> str:
    if result.get("status") != "ok":
        return f"FAILED ({result.get('error')})"
    if result["mode"] == "bisect":
        return f"longest {longest_text(result)}"
    return f"{result['tokens_per_s']:,.0f} tokens/s, {gib(result.get('peak_allocated_gib'))} GiB peak"
