"""From the command line to the plan: the cases to run, in order, and the settings they share."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .checkpoints import DEFAULT_CACHE
from .workload import LORA, LORA_TARGETS, RL_NEW_TOKENS, RL_PROMPTS, RL_REPLIES, SHAPES

PATHS = ("hf", "unsloth", "shim")
PRECISIONS = ("bf16", "qlora")
#: Gradient checkpointing on the Unsloth paths: Unsloth's own, which keeps the checkpointed
#: activations in host memory ("offload"), or plain checkpointing on the card ("gpu").
CHECKPOINTING = ("offload", "gpu")
#: What shares a worker process: each case its own; one process per path and shape that
#: runs the shape's precisions in turn; or one process per path that runs all of its cases.
#: The import of Unsloth (about 25 s a process in the committed H200 runs) is then paid
#: once per process, not per case; the paths never share one.
PROCESS_PER = ("case", "shape", "path")
#: ``--rl``: room for the chat prompt in the loaders' max_length, above the new tokens.
RL_PROMPT_ROOM = 1024
#: ``--rl``'s default timed and warm-up steps. Two warm-ups: on one NVIDIA H200 (Unsloth
#: 2026.10.9, Qwen3-1.7B bf16) the first step compiled Unsloth's blocks (69 s) and the second
#: compiled again in the reference pass (8.8 s against 0.17 s from the third step on).
RL_STEPS, RL_WARMUP = 3, 2

#: ``--qkv-bias-compare``'s batch per shape where 4 is too small to measure. At batch 4 x 2048
#: a Qwen2.5-1.5B step is about 0.2 s of small kernels; the card waits on the host and step
#: times wander by about 30%, more than the stock-to-bound gap. At 12 two runs of one label
#: agreed within 0.2% (H200, BENCHMARKS.md).
QKV_COMPARE_BATCH = {"qwen2.5-1.5b": 12}


@dataclass(frozen=True)
class Case:
    """One worker process: a path training one shape at one precision."""

    mode: str  # train | bisect | rl
    shape: str
    precision: str
    path: str  # hf | unsloth | shim
    batch: int  # rl: prompts per step
    seq_len: int  # train: the sequence length; bisect: the upper bound of the search; rl: new tokens
    label: str = ""  # --qkv-bias-compare: stock | shim | bound
    run: int = 1  # --qkv-bias-compare: the second stock run is run 2; --rl: the round
    drop_qkv_bias: bool = False
    replies: int = 0  # rl: sampled replies per prompt

    @property
    def id(self) -> str:
        name = self.label or self.path
        suffix = f"-{self.run}" if self.run > 1 else ""
        return f"{self.mode}-{self.shape}-{self.precision}-{name}{suffix}"

    @property
    def run_name(self) -> str:
        """``stock``, ``stock #2``: how the reports name a run of ``--qkv-bias-compare``."""
        return f"{self.label}{f' #{self.run}' if self.run > 1 else ''}"

    def describe(self) -> str:
        who = self.path if not self.label else self.run_name
        if self.label == "bound":
            who += " (stock Unsloth, q/k/v biases dropped)"
        if self.mode == "bisect":
            return f"{self.shape} {self.precision} {who}: longest sequence at batch {self.batch}"
        if self.mode == "rl":
            return f"{self.shape} {self.precision} {who}: {rl_size(self.batch, self.replies, self.seq_len)}"
        return f"{self.shape} {self.precision} {who}: batch {self.batch} x {self.seq_len}"


@dataclass(frozen=True)
class Settings:
    steps: int = 6
    warmup: int = 2
    device: str = "cuda"
    bisect_low: int = 1024
    bisect_high: int = 131072
    bisect_step: int = 1024
    case_timeout: float = 1800.0
    seed: int = 0
    rounds: int = 1
    gpus: tuple[str, ...] = ()
    checkpointing: str = "offload"  # Unsloth paths: "offload" (its "unsloth" mode) or "gpu" (plain)
    process_per: str = "case"  # case | shape | path (PROCESS_PER)


def rl_size(prompts: int, replies: int, new_tokens: int) -> str:
    """How ``--rl`` states a step's size."""
    return f"{prompts} prompts x {replies} replies x {new_tokens} new tokens"


def parse_batch(text: str) -> tuple[int, dict[str, int]]:
    """``4`` or ``4,qwen3-8b=2,qwen2.5-7b=2``: the batch, and per-shape overrides."""
    default: int | None = None
    per_shape: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, value = part.rpartition("=")
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"batch: {part!r} is not N or SHAPE=N") from None
        if number <= 0:
            raise argparse.ArgumentTypeError(f"batch: {part!r} must be positive")
        if not name:
            default = number
        elif name in SHAPES:
            per_shape[name] = number
        else:
            raise argparse.ArgumentTypeError(f"batch: unknown shape {name!r}; known: {', '.join(SHAPES)}")
    if default is None and not per_shape:
        raise argparse.ArgumentTypeError("batch: empty")
    return (default or 0), per_shape


def _names(text: str, known: Iterable[str], what: str) -> list[str]:
    known = list(known)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{what}: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}"
        )
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", help=f"comma-separated, of {', '.join(SHAPES)} (default per mode)")
    parser.add_argument("--paths", help="comma-separated, of hf, unsloth, shim (default: all three)")
    parser.add_argument("--precisions", help="comma-separated, of bf16, qlora (default per mode)")
    parser.add_argument(
        "--batch",
        help="N, or N,SHAPE=M,... for per-shape batches "
        "(default 4; --max-seq-bisect: 1; --qkv-bias-compare: 4, qwen2.5-1.5b=12)",
    )
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--steps", type=int, help="timed steps; the median is reported (default 6; --rl: 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2)")
    parser.add_argument(
        "--out", type=Path, default=Path("bench-out"), help="where results go (default ./bench-out)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"random-weight checkpoints (default {DEFAULT_CACHE})",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--max-seq-bisect",
        action="store_true",
        help="per path, the longest sequence that trains one step (default qwen3-8b, qlora, batch 1)",
    )
    mode.add_argument(
        "--qkv-bias-compare",
        action="store_true",
        help="Qwen2.5: stock, shim, biases dropped (bound), stock again; how much of the gap the shim closes",
    )
    mode.add_argument(
        "--rl",
        action="store_true",
        help="GRPO-style steps: generate (--prompts x --replies x --new-tokens), reference log-probs "
        "with the adapter disabled, policy forward/backward; time and memory per slice "
        "(default qwen3-1.7b,qwen3-8b, bf16 and qlora)",
    )
    parser.add_argument(
        "--prompts", type=int, default=RL_PROMPTS, help=f"--rl: prompts per step (default {RL_PROMPTS})"
    )
    parser.add_argument(
        "--replies",
        type=int,
        default=RL_REPLIES,
        help=f"--rl: sampled replies per prompt (default {RL_REPLIES})",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=RL_NEW_TOKENS,
        help=f"--rl: tokens each reply generates, all to full length (default {RL_NEW_TOKENS})",
    )
    parser.add_argument(
        "--process-per",
        choices=PROCESS_PER,
        default="case",
        help="case: every case in a process of its own (default); shape: one process per path and "
        "shape runs that shape's precisions in turn; path: one process per path runs all its cases "
        "(Unsloth's import paid once per process; paths never share one)",
    )
    parser.add_argument(
        "--checkpoints-only",
        action="store_true",
        help="build the plan's random-weight checkpoints into --cache-dir and stop",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="--qkv-bias-compare: rounds of stock, shim, bound, alternate ones reversed "
        "(default 1, then stock once more); --rl: rounds of stock and the shim, every other "
        "one the shim first, hf once after them (identical processes' spread beside the ratio)",
    )
    parser.add_argument(
        "--gpus",
        help="comma-separated CUDA device indices to run on at once, one table row (shape and "
        "precision) per card at a time (default: the one GPU this process sees)",
    )
    parser.add_argument(
        "--checkpointing",
        choices=CHECKPOINTING,
        default="offload",
        help="Unsloth paths' gradient checkpointing: offload (Unsloth's own, activations in host memory; "
        "default) or gpu (plain, activations stay on the card); hf always keeps them on the card",
    )
    parser.add_argument("--bisect-low", type=int, default=1024, help="--max-seq-bisect: shortest length")
    parser.add_argument("--bisect-high", type=int, default=131072, help="--max-seq-bisect: upper bound")
    parser.add_argument("--bisect-step", type=int, default=1024, help="--max-seq-bisect: resolution")
    parser.add_argument(
        "--case-timeout", type=float, default=1800.0, help="seconds before a case's worker is killed"
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="merge into the results of the same mode already in --out (a case run again replaces its old result)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and run nothing")
    # CPU runs of the hf path exercise the pipeline end to end where there is no GPU (tests).
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)


def parse_gpus(text: str) -> tuple[str, ...]:
    """``0,1,2``: distinct CUDA device indices, in order."""
    gpus = tuple(part.strip() for part in text.split(",") if part.strip())
    if not gpus or not all(g.isdigit() for g in gpus):
        raise argparse.ArgumentTypeError(f"--gpus {text!r}: give CUDA device indices, e.g. 0,1,2,3")
    if len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"--gpus {text!r}: an index is repeated")
    return gpus


def qkv_cases(base: Case, rounds: int) -> list[Case]:
    """stock, shim, bound per round, every other round reversed; one round ends with stock again."""
    variants = {
        "stock": replace(base, label="stock"),
        "shim": replace(base, label="shim", path="shim"),
        "bound": replace(base, label="bound", drop_qkv_bias=True),
    }
    order = [*variants]
    labels = [label for r in range(rounds) for label in (order if r % 2 == 0 else order[::-1])]
    if rounds == 1:
        labels.append("stock")  # bracket the run: drift shows as two stock runs apart
    seen: dict[str, int] = {}
    cases = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        cases.append(replace(variants[label], run=seen[label]))
    return cases


def rl_cases(base: Case, paths: Sequence[str], rounds: int) -> list[Case]:
    """One RL row's runs: round 1 runs ``paths`` in the order given; each later round runs
    stock and the shim again, every other one in reverse (drift over the run then falls on
    both alike); hf runs in round 1 only. On Qwen3 the shim runs no code inside a step, yet
    single processes of the two read 0.89x-1.11x apart on an H200 (BENCHMARKS.md): rounds put
    the spread of identical processes beside the ratio."""
    paired = [path for path in paths if path != "hf"]
    later = [
        replace(base, path=path, run=number)
        for number in range(2, rounds + 1)
        for path in (paired[::-1] if number % 2 == 0 else paired)
    ]
    return [replace(base, path=path) for path in paths] + later


def plan(args: argparse.Namespace) -> tuple[list[Case], Settings]:
    """The cases to run, in order, and the settings they share. Raises ArgumentTypeError."""
    default_per_shape: dict[str, int] = {}
    if args.max_seq_bisect:
        mode_shapes, mode_precisions, default_batch = "qwen3-8b", "qlora", 1
    elif args.rl:
        mode_shapes, mode_precisions, default_batch = "qwen3-1.7b,qwen3-8b", "bf16,qlora", args.prompts
    elif args.qkv_bias_compare:
        mode_shapes, mode_precisions, default_batch = "qwen2.5-1.5b,qwen2.5-7b", "bf16,qlora", 4
        default_per_shape = QKV_COMPARE_BATCH
    else:
        mode_shapes, mode_precisions, default_batch = "qwen3-1.7b,qwen2.5-1.5b", "bf16,qlora", 4
    shapes = _names(args.shapes or mode_shapes, SHAPES, "shapes")
    precisions = _names(args.precisions or mode_precisions, PRECISIONS, "precisions")
    if args.qkv_bias_compare:
        if args.paths:
            raise argparse.ArgumentTypeError(
                "--qkv-bias-compare runs stock, shim, bound, stock: drop --paths"
            )
        unbiased = [s for s in shapes if not SHAPES[s].attention_bias]
        if unbiased:
            raise argparse.ArgumentTypeError(
                f"--qkv-bias-compare needs Qwen2 shapes (q/k/v bias); not {', '.join(unbiased)}"
            )
    paths = _names(args.paths or ",".join(PATHS), PATHS, "paths")
    batch, per_shape = parse_batch(args.batch) if args.batch else (default_batch, dict(default_per_shape))
    batch = batch or default_batch
    # An RL step takes seconds where a training step takes a fraction of one.
    steps = args.steps if args.steps is not None else RL_STEPS if args.rl else 6
    warmup = args.warmup if args.warmup is not None else RL_WARMUP if args.rl else 2
    for name, value in (("steps", steps), ("seq-len", args.seq_len), ("bisect-step", args.bisect_step)):
        if value <= 0:
            raise argparse.ArgumentTypeError(f"--{name} must be positive")
    if warmup < 0:
        raise argparse.ArgumentTypeError("--warmup must be >= 0")
    if args.rounds < 1:
        raise argparse.ArgumentTypeError("--rounds must be positive")
    if args.rounds > 1 and not (args.qkv_bias_compare or args.rl):
        raise argparse.ArgumentTypeError("--rounds applies to --qkv-bias-compare and --rl only")
    if args.rl:
        if args.batch or args.seq_len != 2048:
            raise argparse.ArgumentTypeError(
                "--rl sizes its step with --prompts, --replies and --new-tokens, not --batch / --seq-len"
            )
        for name, value in (
            ("prompts", args.prompts),
            ("replies", args.replies),
            ("new-tokens", args.new_tokens),
        ):
            if value <= 0:
                raise argparse.ArgumentTypeError(f"--{name} must be positive")
    elif (args.prompts, args.replies, args.new_tokens) != (RL_PROMPTS, RL_REPLIES, RL_NEW_TOKENS):
        raise argparse.ArgumentTypeError("--prompts, --replies and --new-tokens apply to --rl only")
    if args.process_per != "case" and (args.max_seq_bisect or args.qkv_bias_compare):
        raise argparse.ArgumentTypeError(
            f"--process-per {args.process_per} applies to the main table and --rl (a bisection or a "
            "comparison run keeps a process per case)"
        )
    gpus = parse_gpus(args.gpus) if args.gpus else ()
    if args.max_seq_bisect and not 0 < args.bisect_low <= args.bisect_high:
        raise argparse.ArgumentTypeError("--max-seq-bisect needs 0 < --bisect-low <= --bisect-high")
    settings = Settings(
        steps=steps,
        warmup=warmup,
        device=args.device,
        bisect_low=args.bisect_low,
        bisect_high=args.bisect_high,
        bisect_step=args.bisect_step,
        case_timeout=args.case_timeout,
        rounds=args.rounds,
        gpus=gpus,
        checkpointing=args.checkpointing,
        process_per=args.process_per,
    )
    cases: list[Case] = []
    for shape in shapes:
        size = per_shape.get(shape, batch)
        for precision in precisions:
            if args.max_seq_bisect:
                cases += [Case("bisect", shape, precision, p, size, args.bisect_high) for p in paths]
            elif args.qkv_bias_compare:
                cases += qkv_cases(
                    Case("train", shape, precision, "unsloth", size, args.seq_len), args.rounds
                )
            elif args.rl:
                cases += rl_cases(
                    Case("rl", shape, precision, "", args.prompts, args.new_tokens, replies=args.replies),
                    paths,
                    args.rounds,
                )
            else:
                cases += [Case("train", shape, precision, p, size, args.seq_len) for p in paths]
    return cases, settings


def case_settings(case: Case, settings: Settings) -> dict[str, Any]:
    """The settings a case runs with: handed to its worker and kept on its result (runs merged
    with --append may differ)."""
    if case.mode == "bisect":
        bounds = {"low": settings.bisect_low, "high": settings.bisect_high, "step": settings.bisect_step}
        return {"bisect": bounds, "checkpointing": settings.checkpointing}
    timed = {
        "warmup": settings.warmup,
        "steps": settings.steps,
        "checkpointing": settings.checkpointing,
        "process_per": settings.process_per,
    }
    # A comparison's verdict needs every run its rounds plan (stock closes it): kept per case.
    return {**timed, "rounds": settings.rounds} if case.label else timed


def loader_config(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The loader config of a case: identical on every path but for ``use_unsloth``."""
    return {
        "model": {
            "name": spec["checkpoint"],
            "use_unsloth": spec["path"] != "hf",
            "load_in_4bit": spec["precision"] == "qlora",
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16",
            "dtype": "bfloat16",
            "attn_implementation": "sdpa",
            "gradient_checkpointing": True,
            "offload_checkpoints": spec["checkpointing"] == "offload",
        },
        # rl: the prompt and its replies; train: the sequence.
        "data": {"max_length": spec["seq_len"] + (RL_PROMPT_ROOM if spec.get("mode") == "rl" else 0)},
        "lora": {**LORA, "target_modules": list(LORA_TARGETS)},
    }
