"""``python -m unsloth_qwen_compat bench``: training throughput, peak memory and MFU on this GPU.

Three paths train the same random-weight Qwen checkpoint with the same LoRA, each in a
process of its own (Unsloth patches transformers globally on import, so no process may
host two paths):

- ``hf``: transformers + PEFT (+ bitsandbytes); Unsloth is hidden from that process and
  the worker checks it was never imported;
- ``unsloth``: stock Unsloth (``UNSLOTH_QWEN_COMPAT_DISABLE=1``: the shim is imported but
  patches nothing);
- ``shim``: Unsloth with the shim active, opt-in speed patches included (they are
  opt-in until this bench has measured them).

Both Unsloth paths and the HF path load through :mod:`unsloth_qwen_compat.loading`, so
quantization (NF4, double quant, bf16 compute) and LoRA (r=16, alpha=16, dropout 0,
q/k/v/o/gate/up/down) are the same. Precisions: ``bf16`` LoRA and ``qlora`` (4-bit NF4
quantized on load). Shapes are Qwen's published configs with random weights, built once
into ``--cache-dir``. A step is forward + backward + AdamW (lr 1e-4) on random token ids
with gradient checkpointing on; after ``--warmup`` steps the peak-memory counter is reset
and ``--steps`` steps are timed. Reported: the median step, tokens/s = batch x seq / that
median, the peak of ``torch.cuda.max_memory_allocated`` over the timed steps, and MFU.

MFU (model FLOPs utilisation) counts the FLOPs the model needs per token, not what the
run executes (gradient checkpointing's recomputed forward is not counted)::

    flops/token = 4 * N + 6 * N_lora + 12 * L * H * d * S

``N``: parameters of every matrix multiply (the q/k/v/o/gate/up/down projections and the
output head; the embedding lookup is no multiply). The base is frozen, so it costs a
forward (2N) and the backward to its input (2N) but no weight gradient (the usual 6N is
for full fine-tuning). ``N_lora``: the adapter, trained, so 6 per parameter. The last
term is attention's score and value products (QK^T and AV, 2 x 2 FLOPs per multiply-add,
forward plus a backward twice as large) for ``L`` layers, ``H`` query heads of size
``d`` and sequence length ``S``, with no discount for the causal mask (as PaLM's
appendix counts it). MFU = tokens/s x flops/token / the card's peak dense bf16 FLOP/s
(:data:`PEAK_BF16_DENSE_FLOPS`; an unknown card gets no MFU).

Two other modes:

- ``--max-seq-bisect``: per path, the longest sequence that trains one step without
  running out of GPU memory (default Qwen3-8B, QLoRA, batch 1), found by bisection in one
  worker process per path;
- ``--qkv-bias-compare``: for Qwen2.5 shapes, step time of stock Unsloth, the shim, and
  stock Unsloth on the same shape with the q/k/v biases dropped (``bound``: the fused LoRA
  QKV kernel engages), run in that order with a second stock run last (``--rounds N``:
  N rounds, every other one in reverse order, so drift over the run falls on all three);
  reports how much of the stock-to-bound gap the shim closes. Its default batch is 12 at
  Qwen2.5-1.5B, where 4 is too noisy to rate the gap (``QKV_COMPARE_BATCH``).

``--gpus 0,1,2,3`` runs on several GPUs of one machine at once: the runs of one shape and
precision (one table row, or one path of a bisection) stay together on one card, in
order, so every ratio is taken on a single card; rows go to whichever card is free.
The cards share the host, so rows running at once can slow each other a little.
``--checkpointing gpu`` gives the Unsloth paths plain checkpointing instead of Unsloth's
offload of checkpointed activations to host memory (they stay on the card, as on the hf
path). Small shapes at batch 4 are noisy either way: a step is short enough that the card
waits on the host; a larger ``--batch`` steadies them.

Results go to ``--out``: ``bench.json`` / ``bench.md`` / ``bench.png`` (``max_seq.*``,
``qkv_bias.*`` for the other modes), one log per case under ``logs/``. ``--append`` merges
into the results already there, so a long plan can run as several short invocations.
The reports are rewritten after every case, so a run that is stopped keeps what it measured.
Exit status: 0 when every case passed, 1 when any failed (a failed case is recorded with
its error's last line and the run goes on), 2 without a CUDA GPU or on bad arguments
(``--dry-run`` prints the plan anywhere).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import queue
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from . import _env

PATHS = ("hf", "unsloth", "shim")
PRECISIONS = ("bf16", "qlora")
#: Gradient checkpointing on the Unsloth paths: Unsloth's own, which keeps the checkpointed
#: activations in host memory ("offload"), or plain checkpointing on the card ("gpu").
CHECKPOINTING = ("offload", "gpu")
LORA = {"r": 16, "alpha": 16, "dropout": 0.0, "bias": "none"}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LEARNING_RATE = 1e-4
GIB = 2**30

#: Peak dense bf16 tensor FLOP/s by card, matched in order against the CUDA device name
#: (``NVIDIA H100 80GB HBM3`` is the SXM part). NVL variants have other peaks: no MFU.
PEAK_BF16_DENSE_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)

#: Where the benchmark writes its random-weight checkpoints, one directory per shape.
DEFAULT_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unsloth_qwen_compat" / "bench"
)

# Bump when the way checkpoints are built changes, so old ones are not reused.
CHECKPOINT_FORMAT = 1
#: The worker, started by file so that it can hide Unsloth before this package (whose
#: ``__init__`` imports Unsloth) is imported: ``-m unsloth_qwen_compat._bench_worker`` cannot.
WORKER_FILE = Path(__file__).with_name("_bench_worker.py")
#: The directory that holds this package (and, in a checkout, ``conformance/``).
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """A model shape as its published ``config.json`` states it (weights are random)."""

    name: str
    model_type: str  # qwen2 (q/k/v carry a bias) | qwen3
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    #: The model card's "Number of Parameters" (None for the test shapes).
    published_params: float | None = None

    @property
    def attention_bias(self) -> bool:
        return self.model_type == "qwen2"

    def config_kwargs(self, transformers_major: int) -> dict[str, Any]:
        """Keyword arguments for ``AutoConfig.for_model(model_type, ...)``."""
        kwargs: dict[str, Any] = {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "use_sliding_window": False,
        }
        if self.model_type == "qwen3":
            kwargs["head_dim"] = self.head_dim  # Qwen2 derives it: hidden / heads
        if transformers_major >= 5:  # v5 keeps theta (and any scaling) in rope_parameters
            kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        else:
            kwargs["rope_theta"] = self.rope_theta
        return kwargs


def _shapes(*shapes: Shape) -> dict[str, Shape]:
    return {shape.name: shape for shape in shapes}


#: Qwen's published configs (Qwen3 base, Qwen2.5 instruct). Qwen2.5-7B pads its vocabulary
#: to 152064, the others have 151936. The tiny shapes (the conformance zoo's size) exercise
#: the pipeline in seconds.
SHAPES = _shapes(
    Shape("qwen3-1.7b", "qwen3", 2048, 6144, 28, 16, 8, 128, 151936, 40960, True, published_params=1.7e9),
    Shape("qwen3-8b", "qwen3", 4096, 12288, 36, 32, 8, 128, 151936, 40960, False, published_params=8.2e9),
    Shape("qwen2.5-1.5b", "qwen2", 1536, 8960, 28, 12, 2, 128, 151936, 32768, True, published_params=1.54e9),
    Shape("qwen2.5-7b", "qwen2", 3584, 18944, 28, 28, 4, 128, 152064, 32768, False, published_params=7.61e9),
    Shape("tiny-qwen3", "qwen3", 256, 512, 2, 4, 2, 64, 1024, 4096, False),
    Shape("tiny-qwen2", "qwen2", 256, 512, 2, 4, 2, 64, 1024, 4096, False),
)


def transformers_major() -> int:
    version = _env.distribution_version("transformers")
    return int(version.split(".")[0]) if version else 0


def build_config(shape: Shape) -> Any:
    """The transformers config for ``shape`` (imports transformers)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(shape.model_type, **shape.config_kwargs(transformers_major()))


# --------------------------------------------------------------------------------------
# FLOPs and MFU
# --------------------------------------------------------------------------------------


def _projection_sizes(shape: Shape) -> dict[str, tuple[int, int]]:
    """(in, out) of each LoRA-targeted projection of one layer."""
    h, inter = shape.hidden_size, shape.intermediate_size
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_key_value_heads * shape.head_dim
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def matmul_params(shape: Shape) -> int:
    """N: weights that take part in a matrix multiply (projections and the output head)."""
    per_layer = sum(n_in * n_out for n_in, n_out in _projection_sizes(shape).values())
    return shape.num_hidden_layers * per_layer + shape.hidden_size * shape.vocab_size


def lora_params(shape: Shape, r: int = LORA["r"]) -> int:
    """N_lora: the adapter's parameters (A: r x in, B: out x r on every projection)."""
    per_layer = sum(r * (n_in + n_out) for n_in, n_out in _projection_sizes(shape).values())
    return shape.num_hidden_layers * per_layer


def flops_per_token(shape: Shape, seq_len: int, r: int = LORA["r"]) -> float:
    """Model FLOPs per trained token, LoRA on a frozen base: 4N + 6 N_lora + 12 L H d S."""
    attention = 12 * shape.num_hidden_layers * shape.num_attention_heads * shape.head_dim * seq_len
    return float(4 * matmul_params(shape) + 6 * lora_params(shape, r) + attention)


FLOPS_FORMULA = (
    "MFU = tokens/s x (4 N + 6 N_lora + 12 L H d S) / peak dense bf16 FLOP/s; N = projection and "
    "output-head weights (frozen: forward 2N + input gradient 2N, no weight gradient), N_lora = "
    "adapter weights (6 per parameter), 12 L H d S = attention scores and values (forward + "
    "backward, causal mask not discounted); recomputation by gradient checkpointing not counted"
)


def peak_bf16_flops(device_name: str | None) -> float | None:
    """The card's peak dense bf16 FLOP/s, or None when it is not in the table."""
    if not device_name or "NVL" in device_name:
        return None
    for key, flops in PEAK_BF16_DENSE_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def mfu(shape: Shape, seq_len: int, tokens_per_s: float, device_name: str | None) -> float | None:
    peak = peak_bf16_flops(device_name)
    if peak is None:
        return None
    return tokens_per_s * flops_per_token(shape, seq_len) / peak


# --------------------------------------------------------------------------------------
# Search and comparison arithmetic
# --------------------------------------------------------------------------------------


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


def gap_closed(stock: Sequence[float], shim: float, bound: float) -> float | None:
    """Share of the stock-to-bound step-time gap the shim closes: (stock - shim) / (stock - bound).

    ``stock`` is averaged (the stock runs before and after bracket drift). None when there
    is no gap to close (bound not faster than stock).
    """
    base = statistics.fmean(stock)
    gap = base - bound
    if gap <= 0:
        return None
    return (base - shim) / gap


QKV_TARGET = 0.80


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One worker process: a path training one shape at one precision."""

    mode: str  # train | bisect
    shape: str
    precision: str
    path: str  # hf | unsloth | shim
    batch: int
    seq_len: int  # train: the sequence length; bisect: the upper bound of the search
    label: str = ""  # --qkv-bias-compare: stock | shim | bound
    run: int = 1  # --qkv-bias-compare: the second stock run is run 2
    drop_qkv_bias: bool = False

    @property
    def id(self) -> str:
        name = self.label or self.path
        suffix = f"-{self.run}" if self.run > 1 else ""
        return f"{self.mode}-{self.shape}-{self.precision}-{name}{suffix}"

    def describe(self) -> str:
        who = self.path if not self.label else f"{self.label}{f' #{self.run}' if self.run > 1 else ''}"
        if self.label == "bound":
            who += " (stock Unsloth, q/k/v biases dropped)"
        if self.mode == "bisect":
            return f"{self.shape} {self.precision} {who}: longest sequence at batch {self.batch}"
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
    parser.add_argument(
        "--steps", type=int, default=6, help="timed steps; the median is reported (default 6)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
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
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="--qkv-bias-compare: rounds of stock, shim, bound, alternate ones reversed "
        "(default 1, then stock once more)",
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


#: ``--qkv-bias-compare``'s batch per shape where 4 is too small to measure. At batch 4 x 2048
#: a Qwen2.5-1.5B step is about 0.2 s of small kernels; the card waits on the host and step
#: times wander by about 30%, more than the stock-to-bound gap. At 12 two runs of one label
#: agreed within 0.2% (H200, BENCHMARKS.md).
QKV_COMPARE_BATCH = {"qwen2.5-1.5b": 12}


def plan(args: argparse.Namespace) -> tuple[list[Case], Settings]:
    """The cases to run, in order, and the settings they share. Raises ArgumentTypeError."""
    default_per_shape: dict[str, int] = {}
    if args.max_seq_bisect:
        mode_shapes, mode_precisions, default_batch = "qwen3-8b", "qlora", 1
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
    for name, value in (("steps", args.steps), ("seq-len", args.seq_len), ("bisect-step", args.bisect_step)):
        if value <= 0:
            raise argparse.ArgumentTypeError(f"--{name} must be positive")
    if args.warmup < 0:
        raise argparse.ArgumentTypeError("--warmup must be >= 0")
    if args.rounds < 1:
        raise argparse.ArgumentTypeError("--rounds must be positive")
    if args.rounds > 1 and not args.qkv_bias_compare:
        raise argparse.ArgumentTypeError("--rounds applies to --qkv-bias-compare only")
    gpus = parse_gpus(args.gpus) if args.gpus else ()
    if args.max_seq_bisect and not 0 < args.bisect_low <= args.bisect_high:
        raise argparse.ArgumentTypeError("--max-seq-bisect needs 0 < --bisect-low <= --bisect-high")
    settings = Settings(
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        bisect_low=args.bisect_low,
        bisect_high=args.bisect_high,
        bisect_step=args.bisect_step,
        case_timeout=args.case_timeout,
        rounds=args.rounds,
        gpus=gpus,
        checkpointing=args.checkpointing,
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
            else:
                cases += [Case("train", shape, precision, p, size, args.seq_len) for p in paths]
    return cases, settings


# --------------------------------------------------------------------------------------
# Running workers
# --------------------------------------------------------------------------------------


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
        "data": {"max_length": spec["seq_len"]},
        "lora": {**LORA, "target_modules": list(LORA_TARGETS)},
    }


def checkpoint_dir(shape: Shape, cache_dir: Path) -> Path:
    """Where ``shape``'s checkpoint lives: keyed by the shape and the transformers major version."""
    material = {"format": CHECKPOINT_FORMAT, "shape": asdict(shape), "transformers": transformers_major()}
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir / f"{shape.name}-{key}"


def checkpoint_ready(directory: Path) -> bool:
    return (directory / "COMPLETE").is_file()


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
        from .patches import all_patches

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


def _progress(message: str) -> None:
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
        _progress(f"checkpoint {name}: building random weights (bf16) in {directory}")
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
        _progress(
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
        **_case_settings(case, settings),
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
            _progress(f"{tag}: started")
            started = time.perf_counter()
            if error is not None:
                outcome: dict[str, Any] = {"status": "failed", "error": error}
            else:
                log = out / "logs" / f"{case.id}.log"
                spec = case_spec(case, settings, directory)
                outcome = run_worker(spec, _work_dir(out, gpu), log, settings.case_timeout, gpu)
                outcome["log"] = str(log)
            seconds = time.perf_counter() - started
            result = {**asdict(case), "id": case.id, **_case_settings(case, settings), **outcome}
            result["seconds"] = round(seconds, 1)
            if gpu is not None:
                result["gpu"] = gpu
            _progress(f"{tag}: {_outcome_words(result)} in {seconds:.1f} s")
            with lock:
                done[case.id] = result
                if on_result is not None:
                    on_result([done[c.id] for c in cases if c.id in done])

    _run_on_cards(settings.gpus, [functools.partial(run_group, group) for group in card_groups(cases)])
    return [done[c.id] for c in cases]


def _case_settings(case: Case, settings: Settings) -> dict[str, Any]:
    """The settings a case runs with: handed to its worker and kept on its result (runs merged
    with --append may differ)."""
    if case.mode == "bisect":
        bounds = {"low": settings.bisect_low, "high": settings.bisect_high, "step": settings.bisect_step}
        return {"bisect": bounds, "checkpointing": settings.checkpointing}
    return {"warmup": settings.warmup, "steps": settings.steps, "checkpointing": settings.checkpointing}


def _outcome_words(result: Mapping[str, Any]) -> str:
    if result.get("status") != "ok":
        return f"FAILED ({result.get('error')})"
    if result["mode"] == "bisect":
        return f"longest {_longest_text(result)}"
    return f"{result['tokens_per_s']:,.0f} tokens/s, {_gib(result.get('peak_allocated_gib'))} GiB peak"


# --------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def failures(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per failed row: what failed and the error's last line (the table says only "failed")."""
    return [
        f"failed: {row.get('id') or row['shape'] + ' ' + row['precision']}: {row.get('error')}"
        for row in rows
        if row.get("status") not in ("ok", "incomplete")
    ]


def summarize_train(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add MFU, and ratios to the ``hf`` and ``unsloth`` rows of the same shape and precision."""
    by_key = {(r["shape"], r["precision"], r["path"]): r for r in results if r.get("status") == "ok"}
    rows = []
    for result in results:
        row = dict(result)
        if row.get("status") == "ok":
            shape = SHAPES[row["shape"]]
            row["flops_per_token"] = flops_per_token(shape, row["seq_len"])
            row["mfu"] = mfu(shape, row["seq_len"], row["tokens_per_s"], row.get("device_name"))
            hf = by_key.get((row["shape"], row["precision"], "hf"))
            stock = by_key.get((row["shape"], row["precision"], "unsloth"))
            if hf is not None and row["path"] != "hf":
                row["speed_vs_hf"] = row["tokens_per_s"] / hf["tokens_per_s"]
                if row.get("peak_allocated_gib") and hf.get("peak_allocated_gib"):
                    row["memory_vs_hf"] = row["peak_allocated_gib"] / hf["peak_allocated_gib"]
            if stock is not None and row["path"] == "shim":
                row["shim_vs_unsloth"] = row["tokens_per_s"] / stock["tokens_per_s"]
        rows.append(row)
    return rows


TRAIN_HEADER = (
    "shape",
    "precision",
    "path",
    "batch x seq",
    "step s",
    "tokens/s",
    "peak GiB",
    "MFU",
    "speed vs hf",
    "memory vs hf",
    "shim/unsloth",
)


def train_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    out = []
    for row in rows:
        cells = [row["shape"], row["precision"], row["path"], f"{row['batch']} x {row['seq_len']}"]
        if row.get("status") != "ok":
            out.append([*cells, "failed (below)", "", "", "", "", "", ""])
            continue
        out.append(
            [
                *cells,
                f"{row['median_step_s']:.3f}",
                f"{row['tokens_per_s']:,.0f}",
                _gib(row.get("peak_allocated_gib")),
                "-" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%",
                _ratio(row.get("speed_vs_hf")),
                _ratio(row.get("memory_vs_hf")),
                _ratio(row.get("shim_vs_unsloth")),
            ]
        )
    return out


def _longest_text(row: Mapping[str, Any]) -> str:
    longest = row.get("longest")
    if longest is None:
        return f"< {row['bisect']['low']}"
    return f">= {longest} (upper bound)" if longest >= row["bisect"]["high"] else str(longest)


BISECT_HEADER = (
    "shape",
    "precision",
    "path",
    "batch",
    "longest seq",
    "tokens/s there",
    "peak GiB there",
    "probes",
)


def bisect_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    out = []
    for row in rows:
        cells = [row["shape"], row["precision"], row["path"], str(row["batch"])]
        if row.get("status") != "ok":
            out.append([*cells, "failed (below)", "", "", ""])
            continue
        best = next((p for p in row["probes"] if p["fits"] and p["seq_len"] == row.get("longest")), None)
        out.append(
            [
                *cells,
                _longest_text(row),
                "-" if best is None else f"{best['tokens'] / best['seconds']:,.0f}",
                "-" if best is None else _gib(best.get("peak_allocated_gib")),
                " ".join(f"{p['seq_len']}{'+' if p['fits'] else 'x'}" for p in row["probes"]),
            ]
        )
    return out


def summarize_qkv(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per shape and precision: step-time medians, ratios to stock and the gap closed."""
    rows: list[dict[str, Any]] = []
    for key in dict.fromkeys((r["shape"], r["precision"]) for r in results):
        runs = [r for r in results if (r["shape"], r["precision"]) == key]
        row: dict[str, Any] = {
            "shape": key[0],
            "precision": key[1],
            "batch": runs[0]["batch"],
            "seq_len": runs[0]["seq_len"],
        }
        failed = [r for r in runs if r.get("status") != "ok"]
        row.update({k: runs[0][k] for k in ("warmup", "steps", "checkpointing") if k in runs[0]})
        row["runs"] = {r["id"]: r.get("median_step_s") for r in runs}
        row["qkv_forward"] = {r["id"]: r.get("apply_qkv") for r in runs}
        shim_run = next((r for r in runs if r["label"] == "shim"), {})
        row["shim_patch_action"] = (shim_run.get("patches") or {}).get("qwen2_fused_qkv_bias")
        if failed:
            row["status"] = "failed"
            row["error"] = "; ".join(f"{r['label']}: {r.get('error')}" for r in failed)
            rows.append(row)
            continue
        # Each label's step time: the mean of its runs' medians (with --rounds the runs sit
        # early and late in the run, so drift over the run lands on every label alike).
        each = {
            label: [r["median_step_s"] for r in runs if r["label"] == label]
            for label in ("stock", "shim", "bound")
        }
        if not all(each.values()):  # reports are written while the run goes on
            row["status"] = "incomplete"
            rows.append(row)
            continue
        stock = each["stock"]
        shim, bound = statistics.fmean(each["shim"]), statistics.fmean(each["bound"])
        base = statistics.fmean(stock)
        # Identical processes (runs of one label) that differ by more than stock differs from
        # bound: the gap cannot be told from noise, whichever way it points.
        spread = max(max(times) - min(times) for times in each.values())
        row.update(
            status="ok",
            stock_s=stock,
            shim_s=shim,
            bound_s=bound,
            shim_runs_s=each["shim"],
            bound_runs_s=each["bound"],
            shim_vs_stock=shim / base,
            bound_vs_stock=bound / base,
            gap_closed=gap_closed(stock, shim, bound),
            run_spread_s=spread,
            gap_within_noise=abs(base - bound) <= spread,
        )
        rows.append(row)
    return rows


QKV_HEADER = (
    "shape",
    "precision",
    "stock s (each run)",
    "shim s",
    "bound s",
    "shim/stock",
    "bound/stock",
    f"gap closed (target >= {QKV_TARGET:.2f})",
)


def qkv_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    out = []
    for row in rows:
        cells = [row["shape"], row["precision"]]
        if row["status"] != "ok":
            state = "running" if row["status"] == "incomplete" else "failed (below)"
            out.append([*cells, state, "", "", "", "", ""])
            continue
        closed = row["gap_closed"]
        if row["gap_within_noise"]:
            gap = statistics.fmean(row["stock_s"]) - row["bound_s"]
            verdict = (
                f"not resolved: runs of one label differ by up to {row['run_spread_s']:.4f} s, stock - bound "
                f"is {gap:+.4f} s (a larger --batch, so the host stays ahead of the card, or more --rounds)"
            )
        elif closed is None:
            verdict = "n/a (bound not faster)"
        else:
            verdict = f"{closed:.2f} ({'met' if closed >= QKV_TARGET else 'not met'})"
        out.append(
            [
                *cells,
                " / ".join(f"{s:.4f}" for s in row["stock_s"]),
                _mean_and_runs(row["shim_s"], row.get("shim_runs_s", [])),
                _mean_and_runs(row["bound_s"], row.get("bound_runs_s", [])),
                f"{row['shim_vs_stock']:.3f}",
                f"{row['bound_vs_stock']:.3f}",
                verdict,
            ]
        )
    return out


def _mean_and_runs(mean: float, runs: Sequence[float]) -> str:
    """``0.2210``, or ``0.2210 (0.2200 / 0.2220)`` when the mean is of several runs."""
    text = f"{mean:.4f}"
    return text if len(runs) < 2 else f"{text} ({' / '.join(f'{r:.4f}' for r in runs)})"


def _card(results: Sequence[Mapping[str, Any]], settings: Settings) -> str:
    names = sorted({r["device_name"] for r in results if r.get("device_name")})
    if names:
        return ", ".join(names)
    return "CPU" if settings.device == "cpu" else (_gpu_name() or "unknown")


def versions() -> dict[str, str | None]:
    return _env.read_versions()


def render_markdown(
    kind: str,
    rows: Sequence[Mapping[str, Any]],
    settings: Settings,
    commands: Sequence[str],
    card: str,
    installed: Mapping[str, str | None],
) -> str:
    """bench.md / max_seq.md / qkv_bias.md: the card, the versions, the command, the table."""
    title = {
        "train": "Training throughput: HF + PEFT, stock Unsloth, Unsloth with the shim",
        "bisect": "Longest trainable sequence without running out of GPU memory",
        "qkv": "Qwen2 fused LoRA QKV with bias: stock, shim, bound (biases dropped)",
    }[kind]
    peak = peak_bf16_flops(card)
    lines = [
        f"# {title}",
        "",
        f"- card: {card}"
        + (f" (MFU against {peak / 1e12:.0f} TFLOP/s dense bf16)" if kind == "train" and peak else ""),
        "- versions: "
        + ", ".join(f"{name} {version or 'not installed'}" for name, version in installed.items()),
        *(f"- command: `{command}`" for command in commands),
        "- random-weight checkpoints of Qwen's published shapes; random token ids; LoRA r=16, alpha=16, "
        f"dropout 0 on q/k/v/o/gate/up/down; {_checkpointing_text(rows, settings)}; AdamW lr 1e-4; "
        "qlora = 4-bit NF4, double quant, bf16 compute; each run in a process of its own; "
        "PYTORCH_ALLOC_CONF=expandable_segments:True for every path (Unsloth sets it on import)",
    ]
    if settings.gpus:
        lines.append(
            f"- run on GPUs {','.join(settings.gpus)} at once (`--gpus`): the runs of one row share one card "
            "(`gpu` of each case in the JSON), so its ratios are taken on a single card"
        )
    if kind == "train":
        lines += [
            f"- {_steps_text(rows, settings)}; tokens/s = batch x seq / median step; peak = "
            "torch.cuda.max_memory_allocated over the timed steps",
            f"- {FLOPS_FORMULA}",
            "- speed vs hf and memory vs hf: tokens/s and peak memory over the hf row of the same shape "
            "and precision; shim/unsloth: tokens/s of the shim over stock Unsloth",
            "",
            _markdown_table(TRAIN_HEADER, train_rows(rows)),
        ]
    elif kind == "bisect":
        lines += [
            f"- bisection over {settings.bisect_low}..{settings.bisect_high} tokens in steps of "
            f"{settings.bisect_step}, one training step per probe (forward, backward, AdamW), one process "
            "per path; a probe that runs out of memory frees the cache and the search goes on",
            "- probes: length then + (trained) or x (out of memory), in the order tried",
            "",
            _markdown_table(BISECT_HEADER, bisect_rows(rows)),
        ]
    else:
        lines += [
            f"- step time: {_steps_text(rows, settings)}; runs in "
            f"this order: {_qkv_order(settings.rounds)}; stock: UNSLOTH_QWEN_COMPAT_DISABLE=1; bound: stock "
            "Unsloth with every q/k/v bias set to None before LoRA is attached (a different model, but it "
            "shows what the fused kernel buys)",
            "- each of stock, shim, bound: the mean of its runs' medians; ratios against stock; "
            "gap closed = (stock - shim) / (stock - bound)",
            "",
            _markdown_table(QKV_HEADER, qkv_rows(rows)),
            "",
            "QKV forward per layer (Unsloth's `apply_qkv`), and the shim's `qwen2_fused_qkv_bias` action:",
            "",
        ]
        for row in rows:
            forward = "; ".join(f"{run}: {_counts(value)}" for run, value in row["qkv_forward"].items())
            lines.append(
                f"- {row['shape']} {row['precision']}: {forward}; shim patch: {row['shim_patch_action']}"
            )
    failed = failures(rows)
    return "\n".join(lines + ([""] + failed if failed else [])) + "\n"


def _qkv_order(rounds: int) -> str:
    return ", ".join(
        f"{c.label}{f' #{c.run}' if c.run > 1 else ''}"
        for c in qkv_cases(Case("train", "", "", "", 0, 0), rounds)
    )


def _steps_text(rows: Sequence[Mapping[str, Any]], settings: Settings) -> str:
    used = {(r["warmup"], r["steps"]) for r in rows if "steps" in r} or {(settings.warmup, settings.steps)}
    if len(used) > 1:
        return "warm-up and timed steps differ between the merged runs (see each case in the JSON)"
    warmup, steps = used.pop()
    return f"{_count(warmup, 'warm-up step')}, then the median of {_count(steps, 'timed step')}"


def _checkpointing_text(rows: Sequence[Mapping[str, Any]], settings: Settings) -> str:
    used = {r["checkpointing"] for r in rows if "checkpointing" in r} or {settings.checkpointing}
    if len(used) > 1:
        return "gradient checkpointing on, its mode differs between the merged runs (see the JSON)"
    if used.pop() == "gpu":
        return "gradient checkpointing on, activations kept on the card on every path (Unsloth: plain mode)"
    return "gradient checkpointing on (Unsloth paths: Unsloth's mode, activations offloaded to host memory)"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _counts(value: Mapping[str, int] | None) -> str:
    return "-" if not value else ", ".join(f"{name} x{count}" for name, count in value.items())


def write_png(rows: Sequence[Mapping[str, Any]], path: Path) -> str | None:
    """Bar charts of tokens/s and peak GiB per case; None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "bench.png skipped: matplotlib is not installed (pip install 'unsloth-qwen-compat[bench]')"
    groups = list(dict.fromkeys((r["shape"], r["precision"]) for r in rows))
    paths = list(dict.fromkeys(r["path"] for r in rows))
    ok = {(r["shape"], r["precision"], r["path"]): r for r in rows if r.get("status") == "ok"}
    figure, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(groups) * 2), 4.5))
    width = 0.8 / max(1, len(paths))
    for axis, key, label in (
        (axes[0], "tokens_per_s", "tokens/s"),
        (axes[1], "peak_allocated_gib", "peak GiB"),
    ):
        for i, name in enumerate(paths):
            values = [ok.get((*g, name), {}).get(key) or 0 for g in groups]
            axis.bar([g + i * width for g in range(len(groups))], values, width, label=name)
        axis.set_xticks([g + width * (len(paths) - 1) / 2 for g in range(len(groups))])
        axis.set_xticklabels([f"{s}\n{p}" for s, p in groups], fontsize=8)
        axis.set_ylabel(label)
        axis.set_title(label)
    # Above both plots: inside one, the legend covers the tallest bars.
    figure.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=len(paths))
    figure.tight_layout(rect=(0, 0, 1, 0.92))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def _gpu_name() -> str | None:
    """The CUDA GPU this process sees (detected when the package was imported), or None."""
    from . import environment

    gpu = environment().gpu
    return None if gpu is None else gpu.name


def _gpu_count() -> int:
    from . import environment

    gpu = environment().gpu
    return 0 if gpu is None else gpu.count


def run(args: argparse.Namespace, command: str) -> int:
    """Run the benchmark ``args`` describe; 0 when every case passed, 1 if any failed, 2 on bad use."""
    try:
        cases, settings = plan(args)
    except argparse.ArgumentTypeError as problem:
        print(f"bench: {problem}", file=sys.stderr)
        return 2
    kind = "bisect" if args.max_seq_bisect else "qkv" if args.qkv_bias_compare else "train"
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
        print(f"{len(cases)} cases, each in its own process{where}; results would go to {args.out}")
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
    stem = {"train": "bench", "bisect": "max_seq", "qkv": "qkv_bias"}[kind]
    earlier: dict[str, Any] = {}
    if args.append and (args.out / f"{stem}.json").is_file():
        # Each invocation can stay short (one shape, say) and still add to one table.
        earlier = json.loads((args.out / f"{stem}.json").read_text())
    commands = [*earlier.get("commands", []), command]
    installed = versions()

    def write_reports(
        results: list[dict[str, Any]],
    ) -> tuple[list[dict[str, Any]], list[str], list[list[str]]]:
        fresh = {r["id"] for r in results}
        merged = [r for r in earlier.get("cases", []) if r["id"] not in fresh] + results
        card = _card(merged, settings)
        if kind == "train":
            rows = summarize_train(merged)
            header, table = TRAIN_HEADER, train_rows(rows)
        elif kind == "bisect":
            rows, header, table = list(merged), BISECT_HEADER, bisect_rows(merged)
        else:
            rows = summarize_qkv(merged)
            header, table = QKV_HEADER, qkv_rows(rows)
        report = {
            "kind": kind,
            "commands": commands,
            "card": card,
            "versions": installed,
            "settings": asdict(settings),
            "lora": {**LORA, "target_modules": list(LORA_TARGETS), "learning_rate": LEARNING_RATE},
            "flops_formula": FLOPS_FORMULA if kind == "train" else None,
            "rows": rows,
            "cases": merged,
        }
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
        markdown = render_markdown(kind, rows, settings, commands, card, installed)
        (args.out / f"{stem}.md").write_text(markdown)
        return rows, list(header), table

    results = run_cases(cases, settings, args.out, args.cache_dir, on_result=write_reports)
    rows, header, table = write_reports(results)
    print("\n".join([_table(header, table), *failures(rows)]))
    written = [f"{stem}.json", f"{stem}.md"]
    if kind == "train":
        skipped = write_png(rows, args.out / "bench.png")
        if skipped:
            _progress(skipped)
        else:
            written.append("bench.png")
    failed = [r["id"] for r in results if r.get("status") != "ok"]
    _progress(f"wrote {', '.join(written)} in {args.out}")
    if failed:
        _progress(
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


__all__ = [
    "PATHS",
    "PRECISIONS",
    "SHAPES",
    "Case",
    "Settings",
    "Shape",
    "flops_per_token",
    "gap_closed",
    "longest_fitting",
    "lora_params",
    "main",
    "matmul_params",
    "mfu",
    "peak_bf16_flops",
    "plan",
    "run",
]
