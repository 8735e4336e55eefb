"""``python -m unsloth_qwen_compat bench``: training throughput, peak memory and MFU on this GPU.

The command itself: plan, run the cases, and rewrite the reports in ``--out`` after
every case (see the package's docstring for what is measured and how).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from .. import _env
from .chart import write_png
from .checkpoints import checkpoint_dir, checkpoint_ready
from .planning import Settings, add_arguments, plan
from .report import HEADERS, failures, render_markdown, summarize, table_rows, text_table
from .runner import prepare_checkpoints, process_groups, progress, run_cases
from .workload import (
    FLOPS_FORMULA,
    LEARNING_RATE,
    LORA,
    LORA_TARGETS,
    RL_BETA,
    RL_MICRO_BATCH,
    RL_QUESTIONS,
    SHAPES,
)

#: What every ``--rl`` step holds besides its size (the sizes are on each case).
RL_STEP = {
    "beta": RL_BETA,
    "micro_batch_rows": RL_MICRO_BATCH,
    "sampling": {
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_new_tokens": "= new tokens",
    },
    "reward": "seeded uniform random per reply (random-weight checkpoints: no reward could read the replies)",
    "questions": list(RL_QUESTIONS),
}

#: Each mode's file stem in ``--out``.
STEMS = {"train": "bench", "bisect": "max_seq", "qkv": "qkv_bias", "rl": "rl"}


def _gpu_name() -> str | None:
    """The CUDA GPU this process sees (detected when the package was imported), or None."""
    from .. import environment

    gpu = environment().gpu
    return None if gpu is None else gpu.name


def _gpu_count() -> int:
    from .. import environment

    gpu = environment().gpu
    return 0 if gpu is None else gpu.count


def _card(results: Sequence[Mapping[str, Any]], settings: Settings) -> str:
    names = sorted({r["device_name"] for r in results if r.get("device_name")})
    if names:
        return ", ".join(names)
    return "CPU" if settings.device == "cpu" else (_gpu_name() or "unknown")


def run(args: argparse.Namespace, command: str) -> int:
    """Run the benchmark ``args`` describe; 0 when every case passed, 1 if any failed, 2 on bad use."""
    try:
        cases, settings = plan(args)
    except argparse.ArgumentTypeError as problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    kind = (
        "bisect" if args.max_seq_bisect else "qkv" if args.qkv_bias_compare else "rl" if args.rl else "train"
    )
    if args.dry_run:
        for shape in dict.fromkeys(c.shape for c in cases):
            directory = checkpoint_dir(SHAPES[shape], args.cache_dir)
            state = "cached" if checkpoint_ready(directory) else "to build"
            print(f"checkpoint {shape}: {directory} ({state})")
        for number, case in enumerate(cases, 1):
            extra = (
                f"bisection {settings.bisect_low}..{settings.bisect_high} step {settings.bisect_step}"
                if case.mode == "bisect"
                else f"{settings.warmup} warm-up + {settings.steps} timed steps"
            )
            print(f"[{number}/{len(cases)}] {case.describe()}, {extra}")
        where = f" on GPUs {','.join(settings.gpus)}, one row per card at a time" if settings.gpus else ""
        processes = len(process_groups(cases, settings.process_per))
        per = {"shape": "path and shape", "path": "path"}.get(settings.process_per)
        each = "each in its own process" if per is None else f"in {processes} processes (one per {per})"
        print(f"{len(cases)} cases, {each}{where}; results would go to {args.out}")
        return 0
    if settings.gpus and settings.device == "cuda" and _gpu_count() <= max(map(int, settings.gpus)):
        print(
            f"bench: --gpus {','.join(settings.gpus)} names a GPU this machine does not have "
            f"(it sees {_gpu_count()}); give indices below that",
            file=sys.stderr,
        )
        return 2
    if settings.device == "cuda" and _gpu_name() is None:
        print(
            "bench: needs a CUDA GPU, and torch sees none here (it measures GPU throughput and memory). "
            "Run it on a GPU machine; --dry-run prints the plan without one.",
            file=sys.stderr,
        )
        return 2
    # Workers run in a directory under --out: every path handed to them must be absolute.
    args.out = args.out.expanduser().resolve()
    args.cache_dir = args.cache_dir.expanduser().resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.checkpoints_only:
        ready = prepare_checkpoints((c.shape for c in cases), args.cache_dir, args.out, settings)
        for name, (directory, error) in ready.items():
            print(f"checkpoint {name}: {directory}" + ("" if error is None else f": {error}"))
        return 1 if any(error for _, error in ready.values()) else 0
    stem = STEMS[kind]
    earlier: dict[str, Any] = {}
    if args.append and (args.out / f"{stem}.json").is_file():
        # Each invocation can stay short (one shape, say) and still add to one table.
        earlier = json.loads((args.out / f"{stem}.json").read_text())
    commands = [*earlier.get("commands", []), command]
    installed = _env.read_versions()

    def write_reports(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[list[str]]]:
        fresh = {r["id"] for r in results}
        merged = [r for r in earlier.get("cases", []) if r["id"] not in fresh] + results
        card = _card(merged, settings)
        rows = summarize(kind, merged, settings)
        report = {
            "kind": kind,
            "commands": commands,
            "card": card,
            "versions": installed,
            "settings": asdict(settings),
            "lora": {**LORA, "target_modules": list(LORA_TARGETS), "learning_rate": LEARNING_RATE},
            "flops_formula": FLOPS_FORMULA if kind == "train" else None,
            "rl_step": RL_STEP if kind == "rl" else None,
            "rows": rows,
            "cases": merged,
        }
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
        markdown = render_markdown(kind, rows, settings, commands, card, installed)
        (args.out / f"{stem}.md").write_text(markdown)
        return rows, table_rows(kind, rows)

    results = run_cases(cases, settings, args.out, args.cache_dir, on_result=write_reports)
    rows, table = write_reports(results)
    print("\n".join([text_table(HEADERS[kind], table), *failures(rows)]))
    written = [f"{stem}.json", f"{stem}.md"]
    if kind == "train":
        skipped = write_png(rows, args.out / "bench.png")
        if skipped:
            progress(skipped)
        else:
            written.append("bench.png")
    failed = [r["id"] for r in results if r.get("status") != "ok"]
    progress(f"wrote {', '.join(written)} in {args.out}")
    if failed:
        progress(
            f"{len(failed)} of {len(results)} cases failed: {', '.join(failed)} (logs in {args.out / 'logs'})"
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``bench`` on its own (the CLI's subcommand calls :func:`run`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m unsloth_qwen_compat bench", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv), command_line(argv))


def command_line(argv: Sequence[str]) -> str:
    return shlex.join(["python", "-m", "unsloth_qwen_compat", "bench", *argv])
