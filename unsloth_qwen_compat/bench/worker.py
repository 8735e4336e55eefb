"""One benchmark case, in a process of its own (started by :mod:`unsloth_qwen_compat.bench.runner`).

The parent starts this file by path (``runpy``), not as ``-m unsloth_qwen_compat.bench.worker``:
the ``hf`` path must hide Unsloth before anything imports ``unsloth_qwen_compat``, whose
``__init__`` imports Unsloth. So this module imports nothing of the package at the top.

Arguments: one JSON spec or several (see ``runner.case_spec``), all of one path; several
run in turn in this process (``--process-per shape``), the memory of one freed before the
next. Modes:

- ``prepare``: build the shape's random-weight bf16 checkpoint (on the GPU when there is
  one) and a tokenizer, and ``save_pretrained`` them (``checkpoints.build_checkpoint``);
- ``train``: load through the package's loader, attach LoRA, time the steps;
- ``bisect``: load once, then the longest sequence that trains one step;
- ``rl``: load, attach LoRA, time GRPO-style steps slice by slice (:mod:`.rl`).

Each spec's result, also when its case fails (``status: failed`` with the error's last
line), is written as JSON to its ``spec["result"]`` as soon as it is done; the exit code is
0 only when every one is ``status: ok``.
"""

from __future__ import annotations

import gc
import json
import math
import os
import runpy
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The package's Unsloth hider, run by path: importing it through the package would import Unsloth.
HIDE_UNSLOTH_FILE = Path(__file__).resolve().parents[1] / "_hide_unsloth.py"


def error_line(exc: BaseException) -> str:
    """``Type: message`` as a traceback's last line says it (first and last line when several)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [""]
    message = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(exc).__name__}: {message}".rstrip(": ")[:400]


def _log(message: str) -> None:
    print(f"[bench worker] {message}", flush=True)


# --------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    from unsloth_qwen_compat.bench.checkpoints import build_checkpoint

    built = build_checkpoint(spec["shape"], Path(spec["checkpoint"]), spec["device"], spec["seed"])
    seconds = built.pop("build_seconds")
    _log(f"built {spec['shape']}: {built['parameters'] / 1e9:.3f}B parameters in {seconds:.1f} s")
    return built


# --------------------------------------------------------------------------------------
# train / bisect
# --------------------------------------------------------------------------------------


def drop_qkv_bias(model: Any) -> int:
    """Set every q/k/v projection's bias to None (the ``bound`` run); return how many were dropped."""
    import torch

    dropped = 0
    for module in model.modules():
        for name in ("q_proj", "k_proj", "v_proj"):
            projection = getattr(module, name, None)
            if isinstance(projection, torch.nn.Module) and getattr(projection, "bias", None) is not None:
                projection.bias = None
                dropped += 1
    return dropped


def qkv_forward(model: Any) -> dict[str, int]:
    """How many attention layers use which QKV function (Unsloth sets ``apply_qkv``; HF has none)."""
    names: Counter[str] = Counter()
    for module in model.modules():
        if hasattr(module, "q_proj") and hasattr(module, "k_proj") and hasattr(module, "o_proj"):
            function = getattr(module, "apply_qkv", None)
            names[getattr(function, "__name__", "none") if function is not None else "none"] += 1
    return dict(names)


def watch_sdpa() -> Counter[str]:
    """Count the kinds of input transformers hands ``torch.nn.functional.scaled_dot_product_attention``.

    PyTorch picks its kernel silently: fp32 queries rule out flash attention, and with
    ``enable_gqa`` the memory-efficient kernel too, leaving the math kernel, whose memory
    grows with the square of the length. This says which case a run was in. transformers
    looks the function up on every call, so replacing the module attribute sees them all.
    """
    import torch.nn.functional as F

    seen: Counter[str] = Counter()
    sdpa = F.scaled_dot_product_attention

    def recording(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        mask = kwargs.get("attn_mask", args[0] if args else None)
        seen[
            f"{str(query.dtype).removeprefix('torch.')}"
            f" gqa={bool(kwargs.get('enable_gqa', False))}"
            f" mask={'none' if mask is None else str(mask.dtype).removeprefix('torch.')}"
        ] += 1
        return sdpa(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = recording
    return seen


def _step(model: Any, optimizer: Any, ids: Any) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())  # also waits for the step to finish


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    # Some kernels report it as a plain RuntimeError.
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def check_loaded_shape(config: Any, shape: Any) -> None:
    """Refuse to time a model that is not the row's shape (a row is named by its shape)."""
    text = getattr(config, "get_text_config", lambda: config)()
    loaded = (text.hidden_size, text.num_hidden_layers, text.intermediate_size)
    expected = (shape.hidden_size, shape.num_hidden_layers, shape.intermediate_size)
    if loaded != expected:
        raise RuntimeError(
            f"the checkpoint loaded for {shape.name} has hidden size, layers, MLP size {loaded}, "
            f"not {expected}: the row would time another model"
        )


def train(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from unsloth_qwen_compat.bench.planning import loader_config
    from unsloth_qwen_compat.bench.workload import GIB, LEARNING_RATE, SHAPES
    from unsloth_qwen_compat.loading import attach_lora, count_trainable_parameters, load_base_model

    shape = SHAPES[spec["shape"]]
    cuda = torch.cuda.is_available()
    result: dict[str, Any] = {
        "device_name": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    if cuda:
        free, total = torch.cuda.mem_get_info()
        result.update(gpu_free_gib_at_start=free / GIB, gpu_total_gib=total / GIB)
    config = loader_config(spec)
    started = time.perf_counter()
    model, tokenizer = load_base_model(config)
    check_loaded_shape(model.config, shape)
    result["dropped_qkv_biases"] = drop_qkv_bias(model) if spec["drop_qkv_bias"] else 0
    model = attach_lora(model, config)
    model.train()  # a model left in eval mode skips gradient checkpointing
    result["load_seconds"] = time.perf_counter() - started
    result["trainable_params"] = count_trainable_parameters(model)
    result["apply_qkv"] = qkv_forward(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    device = model.get_input_embeddings().weight.device
    generator = torch.Generator().manual_seed(spec["seed"])

    def random_ids(length: int) -> Any:
        ids = torch.randint(0, shape.vocab_size, (spec["batch"], length), generator=generator)
        return ids.to(device)

    # Unsloth's attention does not go through transformers' SDPA call: watched on hf only
    # (and not while generating, where it is called once per layer and token).
    sdpa_inputs = watch_sdpa() if spec["path"] == "hf" and spec["mode"] != "rl" else None
    if spec["mode"] == "bisect":
        result.update(_bisect(spec, model, optimizer, random_ids, cuda))
    elif spec["mode"] == "rl":
        from unsloth_qwen_compat.bench.rl import timed_rl_steps

        result.update(timed_rl_steps(spec, model, tokenizer, optimizer, cuda, log=_log))
    else:
        result.update(_timed_steps(spec, model, optimizer, random_ids, cuda))
    if sdpa_inputs is not None:
        result["sdpa_inputs"] = dict(sdpa_inputs)
    return result


def _timed_steps(
    spec: dict[str, Any], model: Any, optimizer: Any, random_ids: Any, cuda: bool
) -> dict[str, Any]:
    import torch

    from unsloth_qwen_compat.bench.workload import GIB

    seconds, losses, ended_at = [], [], []
    for step in range(spec["warmup"] + spec["steps"]):
        if step == spec["warmup"] and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()  # the peak of the timed steps only
        ids = random_ids(spec["seq_len"])
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = _step(model, optimizer, ids)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        ended_at.append(round(time.time(), 3))
        losses.append(loss)
        _log(
            f"step {step} {'warm-up' if step < spec['warmup'] else 'timed'}: {seconds[-1]:.4f} s, loss {loss:.4f}"
            f" (ended at {ended_at[-1]:.2f})"
        )
        if not math.isfinite(loss):
            raise RuntimeError(f"loss is {loss} at step {step}")
    timed = seconds[spec["warmup"] :]
    median = statistics.median(timed)
    tokens = spec["batch"] * spec["seq_len"]
    return {
        "step_seconds": timed,
        # Unix time each timed step ended: lines steps up with other processes and GPU telemetry.
        "step_ended_at": ended_at[spec["warmup"] :],
        "warmup_seconds": seconds[: spec["warmup"]],
        "losses": losses,
        "median_step_s": median,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / median,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
    }


def longest_fitting(fits: Callable[[int], bool], low: int, high: int, step: int) -> int | None:
    """The largest ``n`` of ``low, low + step, ... <= high`` with ``fits(n)``; None if ``low`` fails.

    Assumes ``fits`` holds up to some length and fails above it (memory grows with length).
    Probes ``low`` first (a shape that cannot train at all costs one probe), then the top (a
    path that fits everything costs two), then bisects.
    """
    if step <= 0 or high < low:
        raise ValueError(f"need step > 0 and high >= low, got low={low} high={high} step={step}")
    if not fits(low):
        return None
    good, bad = 0, (high - low) // step  # indices into the candidates: good fits, bad unknown
    # With one candidate (low == high) the top is low itself, already probed: a probe can take minutes.
    if bad and fits(low + bad * step):
        return low + bad * step
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(low + middle * step):
            good = middle
        else:
            bad = middle
    return low + good * step


def _bisect(spec: dict[str, Any], model: Any, optimizer: Any, random_ids: Any, cuda: bool) -> dict[str, Any]:
    import torch

    from unsloth_qwen_compat.bench.workload import GIB

    probes: list[dict[str, Any]] = []

    def fits(length: int) -> bool:
        ids = random_ids(length)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        error = None
        try:
            _step(model, optimizer, ids)
        except Exception as exc:
            if not _is_out_of_memory(exc):
                raise
            error = error_line(exc)  # the exception (and the frames it holds) is freed after this block
        del ids
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / GIB
            torch.cuda.empty_cache()
        else:
            peak = None
        probe = {
            "seq_len": length,
            "fits": error is None,
            "seconds": time.perf_counter() - started,
            "tokens": spec["batch"] * length,
            "peak_allocated_gib": peak,
            "error": error,
        }
        probes.append(probe)
        _log(f"probe {length}: {'trained' if error is None else 'out of memory'} in {probe['seconds']:.1f} s")
        return error is None

    bounds = spec["bisect"]
    longest = longest_fitting(fits, bounds["low"], bounds["high"], bounds["step"])
    return {"longest": longest, "probes": probes}


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def run(spec: dict[str, Any]) -> dict[str, Any]:
    # First: on the Unsloth paths this imports Unsloth before transformers (hidden on hf).
    import unsloth_qwen_compat

    report = unsloth_qwen_compat.status()
    verdicts = {p["name"]: p["verdict"] for p in report["patches"]}
    disabled = all(v == "disabled" for v in verdicts.values())
    if spec["path"] == "unsloth" and not disabled:
        raise RuntimeError(
            "the stock Unsloth path runs with UNSLOTH_QWEN_COMPAT_DISABLE=1, but the shim is active"
        )
    if spec["path"] == "shim" and disabled:
        raise RuntimeError("the shim path found the shim disabled (UNSLOTH_QWEN_COMPAT_DISABLE is set)")
    result = prepare(spec) if spec["mode"] == "prepare" else train(spec)
    result["patches"] = {p["name"]: p["action"] for p in report["patches"]}
    result["unsloth_mode"] = report["environment"]["unsloth_mode"]
    if spec["path"] == "hf":
        from unsloth_qwen_compat._hide_unsloth import imported_hidden

        imported = imported_hidden()
        assert not imported, f"the hf path imported {', '.join(imported)}"
    result["unsloth_imported"] = "unsloth" in sys.modules
    return result


def _free_memory() -> None:
    """Between two specs of one process: the last one's model and optimizer are garbage."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str]) -> int:
    specs = [json.loads(Path(path).read_text()) for path in argv]
    paths = {spec["path"] for spec in specs}
    if len(paths) != 1:
        raise SystemExit(f"one worker process runs one path, got {sorted(paths)}")
    if specs[0]["path"] == "hf":
        runpy.run_path(str(HIDE_UNSLOTH_FILE))["hide_unsloth"]()
    failed = 0
    for number, spec in enumerate(specs):
        if number:
            _free_memory()
            _log(f"next case in this process: {spec['id']}")
        started = time.perf_counter()
        try:
            result = {**run(spec), "status": "ok"}
        except Exception as exc:
            traceback.print_exc()
            result = {"status": "failed", "error": error_line(exc)}
        result["worker_seconds"] = time.perf_counter() - started
        # Written to a side file, then renamed: the parent reads results while this process runs.
        staging = Path(f"{spec['result']}.tmp")
        staging.write_text(json.dumps(result, indent=1, default=str))
        staging.replace(spec["result"])
        failed += result["status"] != "ok"
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
