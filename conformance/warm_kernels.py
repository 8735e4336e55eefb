"""Compile the hybrid models' GPU kernels once, beside the workers, before their cases need them.

Unsloth runs the gated-DeltaNet layers of Qwen3.5 / Qwen3.5-MoE / Qwen3-Next through Triton
kernels (its vendored flash-linear-attention) that compile and autotune on first use. On one
NVIDIA H200 (leg 2026.10, fp32), the first forward of the tiny Qwen3.5 took 205 s in one
process (115 Triton compiles) while 14 workers ran beside it; with 14 pytest-xdist workers
every worker met a hybrid model at about the same time and compiled the same kernels at once,
and the leg never ended within its time limit. Triton keeps compiled kernels and autotune
results on disk and inductor keeps compiled graphs there, so one process that compiles them
first turns every other process's compile into a cache hit. Measured there with this module:
the NF4 warm-up of the six hybrid zoo models took 249.5 s (120.5 s of it the first model);
the fp32 one, which then ran a LoRA backward in the same process, had not ended after 370 s.

Under pytest-xdist on a GPU, the controller starts the warm-ups the selected hybrid cases
need as soon as the workers report their collection (:func:`start`), one process per kind and
hybrid family (:func:`lane`), so the three families compile side by side. The kinds: the
leg's dtype (forward and KV-cache decode), the leg's dtype with a LoRA training step
(backward kernels: the slowest to compile), and NF4 (4-bit weights, computed in bf16). While
any warm-up is to run, the hybrid cases are ordered last (conftest.py), and each waits only
for the warm-ups its test needs (:func:`needs`, :func:`wait`), at most ``CONFORMANCE_WARM_WAIT_S`` seconds. The warm-up
only fills caches: a case computes the same with or without it, and a warm-up that fails or is
late costs time, never a result. Warm-ups of one lane take turns on a machine (a lock per
lane): runs side by side, as the retire proof's, compile each kernel once between them, and a
case of a run whose turn has not come goes on once another run has warmed its model.

A warm-up that ends leaves a marker per kind and model inside the compile caches it filled
(Triton's and Inductor's: :func:`cache_markers`), keyed by unsloth_zoo, torch, Triton and the
GPU. A later session whose caches hold every marker a lane needs starts no process for it, and
with every warm-up of the leg marked, the cases go longest first (:func:`collection_rank`): a
second run on a machine, or one whose caches were carried in (conformance/compile_caches.sh,
which packs the markers with the kernels they describe). On an H200 the nine warm-ups took
108-130 s each, twelve workers beside them, with both caches carried in and warm. A marker
lives and goes with its cache's contents: a cache deleted, or unpacked from an older pack,
takes its markers (or their absence) with it.

    python -m conformance.warm_kernels --dir DIR --kind fp32-lora --models qwen3_5-plain,...
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Set by the controller for its workers: the folder of this session's warm-up state files.
DIR_ENV = "CONFORMANCE_WARM_DIR"
#: The longest a hybrid case waits for the warm-ups (then it compiles what it needs itself).
WAIT_ENV = "CONFORMANCE_WARM_WAIT_S"
DEFAULT_WAIT_S = 900.0
#: The warm-up of the 4-bit cases: weights in NF4, computed in bf16.
NF4 = "nf4"
#: Suffix of a warm-up that runs a LoRA training step (the backward kernels).
LORA = "-lora"
#: What a hybrid model's case needs warm, by test: its dtype's forward and decode kernels
#: (``{dtype}``) unless listed. The chat-template and typo cases run no kernel.
NEEDS = {
    "test_lora_gradients": ("{dtype}", "{dtype}" + LORA),
    "test_adapter_save_reload": ("{dtype}", "{dtype}" + LORA),
    "test_nf4_logits": (NF4,),
    "test_chat_template": (),
    "test_lora_target_typo_is_rejected": (),
}


def hybrid_models(nodeids: list[str]) -> list[str]:
    """Names of the hybrid zoo models the selected cases load, in zoo order."""
    from conformance import zoo

    return [
        spec.name
        for spec in zoo.ZOO
        if spec.hybrid and any(f"[{spec}-" in nodeid or f"[{spec}]" in nodeid for nodeid in nodeids)
    ]


def needs(nodeid: str, dtype: str) -> list[str]:
    """The warm-ups one case waits for (none for a case of a non-hybrid model)."""
    if not hybrid_models([nodeid]):
        return []
    test = nodeid.split("::")[-1].split("[")[0]
    return [kind.format(dtype=dtype) for kind in NEEDS.get(test, ("{dtype}",))]


#: Seconds a case took on one NVIDIA H200 (leg 2026.10, fp32, 12 workers, compile caches warm,
#: 2026-12-04; medians by test, a worker's first case left out), not counting references: the
#: non-hybrid and the hybrid models' (Qwen3.5, Qwen3.5-MoE, Qwen3-Next). The hybrid LoRA and
#: adapter cases had not ended when that run stopped (13-43 s in): the figure is a floor.
#: Only the order is used (longest first); another machine's seconds differ, not the order much.
EXPECTED_SECONDS = {
    "test_lora_gradients": (13.1, 30.0),
    "test_adapter_save_reload": (11.2, 30.0),
    "test_fused_qkv_vs_peft_path": (15.7, 15.7),
    "test_fused_qkv_vs_hf_reduced": (16.6, 16.6),
    "test_teacher_forced_decode": (7.0, 9.2),
    "test_greedy_generate": (5.5, 9.4),
    "test_nf4_logits": (6.6, 10.5),
    "test_forward_logits": (2.0, 8.1),
    "test_rope_past_original_window": (3.0, 7.7),
    "test_chat_template": (2.4, 5.6),
    "test_fast_path_taken": (4.4, 4.4),
    "test_fused_qkv_vs_hf": (4.2, 4.2),
    "test_lora_target_typo_is_rejected": (2.8, 4.2),
}


def expected_seconds(nodeid: str) -> float:
    test = nodeid.split("::")[-1].split("[")[0]
    plain, hybrid = EXPECTED_SECONDS.get(test, (5.0, 5.0))
    return hybrid if hybrid_models([nodeid]) else plain


def collection_rank(nodeid: str, kernels_warm: bool = False) -> tuple:
    """Where a case goes in the collection, which pytest-xdist hands out in order (after the
    xdist groups, largest first), two cases a worker at first: longest first, so the leg does
    not end on one worker's long case (:data:`EXPECTED_SECONDS`). While the hybrid models'
    kernels are not yet warm (``kernels_warm`` False), the hybrid cases go after the rest, by
    what they wait for (none, the forward kernels, NF4, the LoRA backward: the slowest warm-up
    last), each by model in the order the warm-ups go. A worker that starts on a case whose
    warm-up is far off holds the cases behind it: on an H200, with the LoRA cases first, three
    runs ended no case in 445 s."""
    from conformance import zoo

    models = hybrid_models([nodeid])
    if not models or kernels_warm:
        return (0, -expected_seconds(nodeid))
    kinds = needs(nodeid, "{dtype}")
    wait = 4 if any(kind.endswith(LORA) for kind in kinds) else 3 if NF4 in kinds else 2 if kinds else 1
    names = [spec.name for spec in zoo.ZOO if spec.hybrid]
    return (wait, names.index(models[0]))


def kinds_needed(nodeids: list[str], dtype: str) -> list[str]:
    """Every warm-up the selected cases wait for, in a fixed order."""
    wanted = {kind for nodeid in nodeids for kind in needs(nodeid, dtype)}
    return [kind for kind in (dtype, dtype + LORA, NF4) if kind in wanted]


def lane(kind: str, model: str) -> str:
    """The warm-up process that warms ``model``'s kernels of ``kind``: one per kind and hybrid
    family, so the families compile side by side (their shapes differ; a family's plain and YaRN
    models share its compiled graphs). On one H200 (leg 2026.10, fp32) one process warming the
    LoRA backward of the six models in turn did not end its first model in about 400 s."""
    from conformance import zoo

    return f"{kind}@{zoo.by_name(model).family}"


def start(directory: Path, nodeids: list[str], dtype: str) -> list[subprocess.Popen]:
    """Start the warm-ups the selected cases need (none when no hybrid case is selected): one
    process per kind and hybrid family (:func:`lane`)."""
    from conformance import zoo

    names = [name for name in hybrid_models(nodeids) if zoo.transformers_builds(zoo.by_name(name))]
    if not names:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    processes = []
    for kind in kinds_needed(nodeids, dtype):
        lanes: dict[str, list[str]] = {}
        for name in names:
            lanes.setdefault(lane(kind, name), []).append(name)
        for name_of_lane, lane_models in lanes.items():
            models = [name for name in lane_models if not warm_in_cache(kind, name)]
            if not models:  # the caches hold it all: no process, nothing to wait for
                (directory / f"{name_of_lane}.skipped").write_text(
                    json.dumps({"kind": kind, "models": lane_models}), encoding="utf-8"
                )
                continue
            log = open(directory / f"{name_of_lane}.log", "w", encoding="utf-8")  # noqa: SIM115 - the child's
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "conformance.warm_kernels",
                    "--dir",
                    str(directory),
                    "--kind",
                    kind,
                    "--models",
                    ",".join(models),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            # Written by the parent, so a worker that looks before the child has started still waits.
            (directory / f"{name_of_lane}.pending").write_text(str(process.pid), encoding="utf-8")
            processes.append(process)
    return processes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    # A finished child the controller has not reaped yet is a zombie: ended, for this purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def wait(kinds: list[str], model: str, print_fn=print) -> float:
    """Block until each warm-up in ``kinds`` has warmed ``model``, ended, or died (or the wait
    limit passed): the seconds waited."""
    directory = os.environ.get(DIR_ENV)
    if not directory or not kinds:
        return 0.0
    limit = float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S))
    started = time.monotonic()
    said = False
    while True:
        pending = [kind for kind in kinds if _pending(Path(directory), kind, model)]
        waited = time.monotonic() - started
        if not pending or waited >= limit:
            return waited
        if not said:
            print_fn(f"[warm kernels] {model} waits for the kernel warm-up ({', '.join(pending)})")
            said = True
        time.sleep(1.0)


def _pending(directory: Path, kind: str, model: str) -> bool:
    name_of_lane = lane(kind, model)
    marker = directory / f"{name_of_lane}.pending"
    try:
        pid = int(marker.read_text(encoding="utf-8") or 0)
    except (OSError, ValueError):
        return False  # not started: nothing to wait for
    warmed = (
        (directory / f"{name_of_lane}.done").exists()
        or (directory / f"{kind}.{model}.ok").exists()
        or warm_in_cache(kind, model)  # another run's warm-up, or an earlier session's
    )
    return not warmed and _alive(pid)


def state(directory: Path) -> dict[str, dict]:
    """Each warm-up the session started: ``ended in N s`` / ``running`` / ``died`` (the end of
    its log then), and the models it warmed so far with their seconds or error."""
    found = {}
    for marker in sorted(Path(directory).glob("*.pending")):
        name_of_lane = marker.name.removesuffix(".pending")
        kind, _, family = name_of_lane.partition("@")
        models = []
        pattern = f"{kind}.{family}-*.ok" if family else f"{kind}.*.ok"
        for ok in sorted(Path(directory).glob(pattern), key=lambda path: path.stat().st_mtime):
            try:
                models.append(json.loads(ok.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
        done = Path(directory) / f"{name_of_lane}.done"
        entry: dict = {"models": models}
        if done.exists():
            try:
                entry["state"] = f"ended in {json.loads(done.read_text(encoding='utf-8'))['seconds']} s"
            except (OSError, ValueError, KeyError):
                entry["state"] = "ended"
        else:
            try:
                alive = _alive(int(marker.read_text(encoding="utf-8") or 0))
            except (OSError, ValueError):
                alive = False
            entry["state"] = "running" if alive else "died"
            try:
                lines = (Path(directory) / f"{name_of_lane}.log").read_text(
                    encoding="utf-8", errors="replace"
                )
                entry["log_tail"] = lines.splitlines()[-5:]
            except OSError:
                pass
        found[name_of_lane] = entry
    for skipped in sorted(Path(directory).glob("*.skipped")):
        try:
            models = json.loads(skipped.read_text(encoding="utf-8"))["models"]
        except (OSError, ValueError, KeyError):
            models = []
        found[skipped.name.removesuffix(".skipped")] = {
            "models": [],
            "state": f"not run: the compile caches already held it ({', '.join(models)})",
        }
    return found


def _warm_one(name: str, kind: str) -> dict:
    """One model through what the kind's cases run: a forward and a KV-cache decode of a
    left-padded batch, or (``-lora``) one LoRA training step with Unsloth's checkpointing."""
    from conformance import candidate, inputs, plan, zoo, zoo_tokenizer

    spec = zoo.by_name(name)
    four_bit, lora = kind == NF4, kind.endswith(LORA)
    dtype = "bf16" if four_bit else kind.removesuffix(LORA)
    started = time.monotonic()

    def phase(what: str) -> None:  # where a slow warm-up spends its time, in its log
        print(f"[warm kernels] {name} {kind}: {what} at {time.monotonic() - started:.1f} s", flush=True)

    model, tokenizer = candidate.load(spec, spec.max_position_embeddings, dtype, four_bit)
    phase("loaded")
    high = zoo_tokenizer.regular_token_count(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = inputs.left_padded(7, [40, 23, 9], high, pad_id)
    if lora:
        model = candidate.attach_lora(model, plan.LORA_RANK, plan.LORA_ALPHA, plan.lora_targets(spec.family))
        candidate.training_mode(model)
        batch = ids[:1].to(candidate.device_of(model))
        loss = model(input_ids=batch, labels=batch).loss
        phase("LoRA forward")
        loss.backward()
        phase("LoRA backward")
    else:
        candidate.forward_logits(model, ids[:1])
        phase("forward")
        candidate.greedy(model, ids, mask, 4, pad_id, use_cache=True)
        phase("KV-cache decode")
    return {"model": name, "seconds": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.warm_kernels", description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--kind", required=True, help=f"fp32 | bf16 | fp16 (each optionally {LORA}) | {NF4}")
    parser.add_argument("--models", required=True, help="comma-separated zoo model names")
    args = parser.parse_args(argv)
    started = time.monotonic()
    results = []
    names = [name for name in args.models.split(",") if name]
    lanes = {lane(args.kind, name) for name in names}
    name_of_lane = lanes.pop() if len(lanes) == 1 else args.kind
    try:
        from conformance import (
            candidate,  # noqa: F401  (the shim, then Unsloth, as in the workers)
            oracle_client,
        )

        oracle_client.ensure_zoo(set(names))
        # One warm-up of a lane at a time on this machine: two runs side by side (the retire
        # proof's shim and upstream runs) compile the same kernels; the second then finds them.
        with oracle_client.exclusive(machine_lock(name_of_lane)):
            _warm_all(names, args, results)
    finally:
        summary = {"kind": args.kind, "seconds": round(time.monotonic() - started, 1), "models": results}
        (args.dir / f"{name_of_lane}.done").write_text(json.dumps(summary), encoding="utf-8")
    return 0


#: The folder, inside each compile cache, of the warm-ups' markers.
MARKER_FOLDER = "unsloth-qwen-compat-warm"


def compile_cache_dirs() -> list[Path]:
    """The caches a warm-up fills: Triton's (compiled kernels, autotune results) and Inductor's
    (compiled graphs; Unsloth drops TORCHINDUCTOR_CACHE_DIR when imported, so usually its
    default), as conformance/compile_caches.sh finds them."""
    triton = os.environ.get("TRITON_CACHE_DIR") or "~/.triton/cache"
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        inductor = cache_dir()
    except Exception:  # noqa: BLE001 - an older torch: its default place
        import getpass

        inductor = os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    return [Path(os.path.expanduser(triton)).absolute(), Path(inductor).absolute()]


@functools.lru_cache(maxsize=1)
def stack_key() -> str:
    """What compiled kernels are good for: unsloth_zoo (whose vendored kernels they are), torch,
    Triton, and the GPU they were compiled for."""
    from importlib import metadata

    import torch

    parts = []
    for package in ("unsloth_zoo", "torch", "triton"):
        try:
            parts.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{package}=none")
    parts.append(torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def cache_markers(kind: str, model: str) -> list[Path]:
    """Where a warm-up of ``kind`` says it compiled ``model``'s kernels: one file in each cache it
    filled, so the marker is packed, unpacked and deleted with the kernels it describes."""
    return [folder / MARKER_FOLDER / f"{kind}.{model}.{stack_key()}.ok" for folder in compile_cache_dirs()]


def warm_in_cache(kind: str, model: str) -> bool:
    """Whether the caches this process uses already hold ``model``'s kernels of ``kind`` (a marker
    in each). A marker whose kernels were since removed costs a case its compile, never a result."""
    return all(marker.is_file() for marker in cache_markers(kind, model))


def all_warm(dtype: str) -> bool:
    """Whether every warm-up a whole leg in ``dtype`` needs is in the caches already."""
    from conformance import zoo

    models = [spec.name for spec in zoo.ZOO if spec.hybrid and zoo.transformers_builds(spec)]
    return all(warm_in_cache(kind, model) for kind in (dtype, dtype + LORA, NF4) for model in models)


def _mark_warm(kind: str, model: str, result: dict) -> None:
    for marker in cache_markers(kind, model):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(result), encoding="utf-8")


def machine_lock(kind: str) -> Path:
    """The lock every warm-up of ``kind`` (a :func:`lane`) on this machine takes (Triton's cache
    is per user)."""
    return _machine_file(f"{kind}.lock")


def _machine_file(name: str) -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"unsloth-qwen-compat-warm-{uid}-{name}"


def _warm_all(names: list[str], args, results: list[dict]) -> None:
    for name in names:
        try:
            results.append(_warm_one(name, args.kind))
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # noqa: BLE001 - pytest's xfail of a refusal too: the case reports it
            results.append({"model": name, "error": f"{type(error).__name__}: {error}"[:400]})
        print(json.dumps(results[-1]), flush=True)
        (args.dir / f"{args.kind}.{name}.ok").write_text(json.dumps(results[-1]), encoding="utf-8")
        if "error" not in results[-1]:
            _mark_warm(args.kind, name, results[-1])


if __name__ == "__main__":
    sys.exit(main())
