"""Compile the hybrid models' GPU kernels once, beside the workers, before their cases need them.

Unsloth runs the gated-DeltaNet layers of Qwen3.5 / Qwen3.5-MoE / Qwen3-Next through Triton
kernels (its vendored flash-linear-attention) that compile and autotune on first use. On one
NVIDIA H200 the first fp32 forward of the tiny Qwen3.5 took 205 s in a worker (115 Triton
compiles, beside 14 other workers), and with 14 pytest-xdist workers every worker met a hybrid
model at about the same time and compiled the same kernels at once: the full leg never ended
within its time limit. Triton keeps compiled kernels and autotune results on disk and
inductor keeps compiled graphs there, so one process that compiles them first turns every
worker's compile into a cache hit.

Under pytest-xdist on a GPU, the controller starts one warm-up process per dtype the hybrid
cases compute in (the leg's dtype; bf16 for 4-bit) as soon as the workers report their
collection (:func:`start`). The hybrid cases are ordered last (conftest.py), and each waits
for the warm-ups to end (:func:`wait`), at most ``CONFORMANCE_WARM_WAIT_S`` seconds. The
warm-up only fills caches: a case computes the same with or without it, and a warm-up that
fails or is late costs time, never a result.

    python -m conformance.warm_kernels --dir DIR --dtype fp32 --models qwen3_5-plain,...
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

#: Set by the controller for its workers: the folder of this session's warm-up state files.
DIR_ENV = "CONFORMANCE_WARM_DIR"
#: The longest a hybrid case waits for the warm-ups (then it compiles what it needs itself).
WAIT_ENV = "CONFORMANCE_WARM_WAIT_S"
DEFAULT_WAIT_S = 900.0
#: The pseudo-dtype of the 4-bit cases: weights in NF4, computed in bf16.
NF4 = "nf4"


def hybrid_models(nodeids: list[str]) -> list[str]:
    """Names of the hybrid zoo models the selected cases load, in zoo order."""
    from conformance import zoo

    return [
        spec.name
        for spec in zoo.ZOO
        if spec.hybrid and any(f"[{spec}-" in nodeid or f"[{spec}]" in nodeid for nodeid in nodeids)
    ]


def dtypes_needed(nodeids: list[str], dtype: str) -> list[str]:
    """The leg's dtype, and NF4 where a 4-bit case of a hybrid model is selected."""
    names = hybrid_models(nodeids)
    nf4 = any(
        "test_nf4_logits" in nodeid and any(f"[{name}" in nodeid for name in names) for nodeid in nodeids
    )
    return [dtype, *([NF4] if nf4 and dtype != NF4 else [])]


def start(directory: Path, nodeids: list[str], dtype: str) -> list[subprocess.Popen]:
    """Start the warm-ups the selected cases need (none when no hybrid case is selected)."""
    from conformance import zoo

    names = [name for name in hybrid_models(nodeids) if zoo.transformers_builds(zoo.by_name(name))]
    if not names:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    processes = []
    for kind in dtypes_needed(nodeids, dtype):
        log = open(directory / f"{kind}.log", "w", encoding="utf-8")  # noqa: SIM115 - the child's
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "conformance.warm_kernels",
                "--dir",
                str(directory),
                "--dtype",
                kind,
                "--models",
                ",".join(names),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        # Written by the parent, so a worker that looks before the child has started still waits.
        (directory / f"{kind}.pending").write_text(str(process.pid), encoding="utf-8")
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


def wait(print_fn=print) -> float:
    """Block until every warm-up of this session has ended (or the wait limit): seconds waited."""
    directory = os.environ.get(DIR_ENV)
    if not directory:
        return 0.0
    limit = float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S))
    started = time.monotonic()
    said = False
    while True:
        pending = []
        for marker in Path(directory).glob("*.pending"):
            done = marker.with_suffix(".done")
            try:
                pid = int(marker.read_text(encoding="utf-8") or 0)
            except (OSError, ValueError):
                continue
            if not done.exists() and _alive(pid):
                pending.append(marker.stem)
        waited = time.monotonic() - started
        if not pending or waited >= limit:
            return waited
        if not said:
            print_fn(
                f"[warm kernels] waiting for the hybrid models' kernel warm-up ({', '.join(sorted(pending))})"
            )
            said = True
        time.sleep(1.0)


def _warm_one(name: str, kind: str) -> dict:
    """One model through the paths the cases take: forward, KV-cache decode of a left-padded
    batch, and (not 4-bit) a LoRA training step with Unsloth's gradient checkpointing."""
    from conformance import candidate, inputs, plan, zoo, zoo_tokenizer

    spec = zoo.by_name(name)
    four_bit = kind == NF4
    started = time.monotonic()
    model, tokenizer = candidate.load(
        spec, spec.max_position_embeddings, "bf16" if four_bit else kind, four_bit
    )
    high = zoo_tokenizer.regular_token_count(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask = inputs.left_padded(7, [40, 23, 9], high, pad_id)
    candidate.forward_logits(model, ids[:1])
    candidate.greedy(model, ids, mask, 4, pad_id, use_cache=True)
    if not four_bit:
        model = candidate.attach_lora(model, plan.LORA_RANK, plan.LORA_ALPHA, plan.lora_targets(spec.family))
        candidate.training_mode(model)
        batch = ids[:1].to(candidate.device_of(model))
        model(input_ids=batch, labels=batch).loss.backward()
    return {"model": name, "seconds": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.warm_kernels", description=__doc__)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--dtype", required=True, help=f"fp32 | bf16 | fp16 | {NF4}")
    parser.add_argument("--models", required=True, help="comma-separated zoo model names")
    args = parser.parse_args(argv)
    started = time.monotonic()
    results = []
    try:
        from conformance import (
            candidate,  # noqa: F401  (the shim, then Unsloth, as in the workers)
            oracle_client,
        )

        names = [name for name in args.models.split(",") if name]
        oracle_client.ensure_zoo(set(names))
        for name in names:
            try:
                results.append(_warm_one(name, args.dtype))
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as error:  # noqa: BLE001 - pytest's xfail of a refusal too: the case reports it
                results.append({"model": name, "error": f"{type(error).__name__}: {error}"[:400]})
            print(json.dumps(results[-1]), flush=True)
    finally:
        summary = {"dtype": args.dtype, "seconds": round(time.monotonic() - started, 1), "models": results}
        (args.dir / f"{args.dtype}.done").write_text(json.dumps(summary), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
