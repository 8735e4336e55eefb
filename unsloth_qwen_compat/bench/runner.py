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


#: How often a running worker is checked for results it has written (several cases share a
#: process with ``--process-per shape`` or ``path``: each is reported as soon as it is done).
POLL_SECONDS = 2.0


def worker_command(*spec_paths: Path) -> list[str]:
    # runpy runs the worker file as __main__ without importing this package first.
    boot = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    return [sys.executable, "-c", boot, str(WORKER_FILE), *map(str, spec_paths)]


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
        # (an explicit "0" in the caller's environment still turns one off). Patches on by
        # default (qwen2_fused_qkv_bias) run there as they are; the caller's off switch is kept.
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
    return run_workers([spec], work, log, timeout, gpu)[0]


def run_workers(
    specs: Sequence[dict[str, Any]],
    work: Path,
    log: Path,
    timeout: float,
    gpu: str | None = None,
    on_result: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run one worker process on ``specs``, in turn; each one's result, or a failed result that
    says why (the process timed out, or ended before writing it).

    ``on_result(index, result)`` is called as each result file appears, while the process
    still runs the next spec; results found only at the end are passed on then.
    """
    work.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    spec_paths, result_paths = [], []
    for spec in specs:
        spec_path = work / f"{spec['id']}.spec.json"
        result_path = work / f"{spec['id']}.result.json"
        result_path.unlink(missing_ok=True)
        spec_path.write_text(json.dumps({**spec, "result": str(result_path)}, indent=1))
        spec_paths.append(spec_path)
        result_paths.append(result_path)
    results: dict[int, dict[str, Any]] = {}

    def collect() -> None:
        for index, path in enumerate(result_paths):
            if index not in results and path.is_file():
                try:
                    results[index] = json.loads(path.read_text())
                except json.JSONDecodeError:
                    continue  # still being written: read it at the next look
                if on_result is not None:
                    on_result(index, results[index])

    timed_out = False
    with log.open("w") as handle:
        process = subprocess.Popen(
            worker_command(*spec_paths),
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=worker_env(specs[0]["path"], specs[0]["device"], gpu),
            cwd=work,  # Unsloth writes its compiled cache here; the cases of a run share it
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    process.wait(timeout=min(POLL_SECONDS, max(deadline - time.monotonic(), 0.01)))
                    break
                except subprocess.TimeoutExpired:
                    collect()
                    if time.monotonic() >= deadline:
                        timed_out = True
                        process.kill()
                        process.wait()
                        break
        except BaseException:
            process.kill()
            process.wait()
            raise
    collect()
    why = ""
    if len(results) < len(specs) and not timed_out:
        why = last_line(log.read_text(errors="replace")) or "no output"
    outcomes = []
    for index in range(len(specs)):
        result = results.get(index)
        if result is None:
            if timed_out:
                result = {"status": "failed", "error": f"timed out after {timeout:.0f} s (killed)"}
            else:
                result = {
                    "status": "failed",
                    "error": f"worker exited {process.returncode} without a result: {why}",
                }
            if on_result is not None:
                on_result(index, result)
        outcomes.append(result)
    if process.returncode != 0 and not timed_out and all(r.get("status") == "ok" for r in outcomes):
        outcomes[-1].update(
            status="failed", error=f"worker exited {process.returncode} after writing its result"
        )
    return outcomes


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


def card_groups(cases: Sequence[Case], process_per: str = "case") -> list[list[Case]]:
    """Cases that must share a card, in order: a table row's runs (shape and precision), or
    one bisection (its own process, its own card); with ``process_per`` "shape", a shape's
    rows (its processes run all its precisions); with "path", every case (a process runs
    all of a path's rows, and each row's ratios need its paths on one card)."""
    groups: dict[Any, list[Case]] = {}
    for case in cases:
        if case.mode == "bisect":
            key: Any = case.id
        elif process_per == "path":
            key = "all"
        elif process_per == "shape":
            key = case.shape
        else:
            key = (case.shape, case.precision)
        groups.setdefault(key, []).append(case)
    return list(groups.values())


def process_groups(cases: Sequence[Case], process_per: str = "case") -> list[list[Case]]:
    """The cases each worker process runs, in order: one each, or a path's cases of one shape
    (``process_per`` "shape") or all of a path's cases ("path") together, in the order of
    their first case."""
    if process_per == "case":
        return [[case] for case in cases]
    groups: dict[Any, list[Case]] = {}
    for case in cases:
        shape = case.shape if process_per == "shape" else ""
        groups.setdefault((case.mode, shape, case.path, case.label, case.run), []).append(case)
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

    def tag(case: Case, gpu: str | None) -> str:
        card = "" if gpu is None else f" (GPU {gpu})"
        return f"[{number[case.id]}/{len(cases)}] {case.describe()}{card}"

    def finish(case: Case, outcome: dict[str, Any], seconds: float, gpu: str | None) -> None:
        result = {**asdict(case), "id": case.id, **case_settings(case, settings), **outcome}
        result["seconds"] = round(seconds, 1)
        if gpu is not None:
            result["gpu"] = gpu
        progress(f"{tag(case, gpu)}: {_outcome_words(result)} in {seconds:.1f} s")
        with lock:
            done[case.id] = result
            if on_result is not None:
                on_result([done[c.id] for c in cases if c.id in done])

    def run_process(group: Sequence[Case], gpu: str | None) -> None:
        if len(group) > 1:
            progress(f"one worker process runs, in turn: {', '.join(case.id for case in group)}")
        for case in group:
            progress(f"{tag(case, gpu)}: started")
        started = time.perf_counter()
        # Each case loads its own shape's checkpoint: a process may run several shapes
        # (--process-per path), and giving them all the first case's checkpoint once timed
        # Qwen3-8B under the name qwen3-1.7b.
        unbuilt = [case for case in group if checkpoints[case.shape][1] is not None]
        for case in unbuilt:
            finish(case, {"status": "failed", "error": checkpoints[case.shape][1]}, 0.0, gpu)
        group = [case for case in group if case not in unbuilt]
        if not group:
            return
        specs = [case_spec(case, settings, checkpoints[case.shape][0]) for case in group]
        if len(group) == 1:
            log = out / "logs" / f"{group[0].id}.log"
            outcome = run_worker(specs[0], _work_dir(out, gpu), log, settings.case_timeout, gpu)
            finish(group[0], {**outcome, "log": str(log)}, time.perf_counter() - started, gpu)
            return
        log = out / "logs" / f"{group[0].id}+{len(group) - 1}.log"
        shared = [case.id for case in group]
        last = [started]

        def on_case(index: int, outcome: dict[str, Any]) -> None:
            now = time.perf_counter()
            finish(group[index], {**outcome, "log": str(log), "process_cases": shared}, now - last[0], gpu)
            last[0] = now

        run_workers(specs, _work_dir(out, gpu), log, settings.case_timeout * len(group), gpu, on_case)

    def run_group(group: Sequence[Case], gpu: str | None) -> None:
        for process in process_groups(group, settings.process_per):
            run_process(process, gpu)

    groups = card_groups(cases, settings.process_per)
    _run_on_cards(settings.gpus, [functools.partial(run_group, group) for group in groups])
    return [done[c.id] for c in cases]


def _outcome_words(result: Mapping[str, Any]) -> str:
    if result.get("status") != "ok":
        return f"FAILED ({result.get('error')})"
    if result["mode"] == "bisect":
        return f"longest {longest_text(result)}"
    if result["mode"] == "rl":
        split = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in result["slice_median_s"].items())
        return (
            f"step {result['median_step_s']:.2f} s ({split}), "
            f"{result['generated_tokens_per_s'] or 0:,.0f} generated tokens/s, "
            f"{gib(result.get('peak_allocated_gib'))} GiB peak"
        )
    return f"{result['tokens_per_s']:,.0f} tokens/s, {gib(result.get('peak_allocated_gib'))} GiB peak"
