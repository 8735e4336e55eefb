"""From the workers' results to the reports: ratios, MFU, the comparison's verdict, tables.

``bench.md`` / ``max_seq.md`` / ``qkv_bias.md`` / ``rl.md`` (:func:`render_markdown`) and the
committed ``BENCHMARKS.md`` (:mod:`.document`) are both written from these functions, so
a verdict reads the same in each.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from .planning import Case, Settings, qkv_cases, rl_size
from .workload import (
    FLOPS_FORMULA,
    RL_BETA,
    RL_MICRO_BATCH,
    RL_SLICES,
    SHAPES,
    flops_per_token,
    mfu,
    peak_bf16_flops,
)

#: ``--qkv-bias-compare``: the share of the stock-to-bound gap the shim has to close.
QKV_TARGET = 0.80
QKV_LABELS = ("stock", "shim", "bound")


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


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
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


# --------------------------------------------------------------------------------------
# The main table
# --------------------------------------------------------------------------------------


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
                gib(row.get("peak_allocated_gib")),
                "-" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%",
                ratio(row.get("speed_vs_hf")),
                ratio(row.get("memory_vs_hf")),
                ratio(row.get("shim_vs_unsloth")),
            ]
        )
    return out


# --------------------------------------------------------------------------------------
# --max-seq-bisect
# --------------------------------------------------------------------------------------


def longest_text(row: Mapping[str, Any]) -> str:
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
                longest_text(row),
                "-" if best is None else f"{best['tokens'] / best['seconds']:,.0f}",
                "-" if best is None else gib(best.get("peak_allocated_gib")),
                " ".join(f"{p['seq_len']}{'+' if p['fits'] else 'x'}" for p in row["probes"]),
            ]
        )
    return out


# --------------------------------------------------------------------------------------
# --qkv-bias-compare
# --------------------------------------------------------------------------------------


def summarize_qkv(results: Sequence[Mapping[str, Any]], rounds: int) -> list[dict[str, Any]]:
    """One row per shape and precision: step-time medians, ratios to stock, the gap closed
    and the verdict. ``rounds``: the plan's, for results that do not record their own."""
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
        base = Case("train", key[0], key[1], "unsloth", row["batch"], row["seq_len"])
        planned = qkv_cases(base, runs[0].get("rounds", rounds))
        present = {r["id"] for r in runs}
        row["missing_runs"] = [case.run_name for case in planned if case.id not in present]
        if failed:
            row["status"] = "failed"
            row["error"] = "; ".join(f"{r['label']}: {r.get('error')}" for r in failed)
            row["verdict"] = "failed (below)"
            rows.append(row)
            continue
        # Each label's step time: the mean of its runs' medians (with --rounds the runs sit
        # early and late in the run, so drift over the run lands on every label alike).
        each = {label: [r["median_step_s"] for r in runs if r["label"] == label] for label in QKV_LABELS}
        if not all(each.values()):  # reports are written while the run goes on
            row["status"] = "incomplete"
            row["verdict"] = "running"
            rows.append(row)
            continue
        stock = each["stock"]
        shim, bound = statistics.fmean(each["shim"]), statistics.fmean(each["bound"])
        base = statistics.fmean(stock)
        # Identical processes (runs of one label) that differ by more than stock differs from
        # bound: the gap cannot be told from noise, whichever way it points.
        spread = max(max(times) - min(times) for times in each.values())
        peaks = {
            label: [r.get("peak_allocated_gib") for r in runs if r["label"] == label] for label in QKV_LABELS
        }
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
            peak_gib={label: max(filter(None, values), default=None) for label, values in peaks.items()},
        )
        row["verdict"] = qkv_verdict(row)
        rows.append(row)
    return rows


def qkv_verdict(row: Mapping[str, Any]) -> str:
    """Whether the shim closes :data:`QKV_TARGET` of the gap, from a complete row of
    :func:`summarize_qkv`; "not resolved" (and why) where the runs cannot say."""
    closed = row["gap_closed"]
    if row["missing_runs"]:
        given = "" if closed is None else f"; {closed:.2f} from the runs there are"
        return (
            f"not resolved: {', '.join(row['missing_runs'])} did not run (the plan's stock runs bracket "
            f"drift over the run){given}"
        )
    if row["gap_within_noise"]:
        gap = statistics.fmean(row["stock_s"]) - row["bound_s"]
        return (
            f"not resolved: runs of one label differ by up to {row['run_spread_s']:.4f} s, stock - bound "
            f"is {gap:+.4f} s (a larger --batch, so the host stays ahead of the card, or more --rounds)"
        )
    if closed is None:
        return "n/a (bound not faster)"
    return f"{closed:.2f} ({'met' if closed >= QKV_TARGET else 'not met'})"


QKV_HEADER = (
    "shape",
    "precision",
    "stock s (each run)",
    "shim s",
    "bound s",
    "shim/stock",
    "bound/stock",
    f"gap closed (target >= {QKV_TARGET:.2f})",
    "peak GiB stock / shim / bound",
)


def qkv_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    out = []
    for row in rows:
        cells = [row["shape"], row["precision"]]
        if row["status"] != "ok":
            out.append([*cells, row["verdict"], "", "", "", "", "", ""])
            continue
        peaks = row.get("peak_gib") or {}
        out.append(
            [
                *cells,
                " / ".join(f"{s:.4f}" for s in row["stock_s"]),
                _mean_and_runs(row["shim_s"], row.get("shim_runs_s", [])),
                _mean_and_runs(row["bound_s"], row.get("bound_runs_s", [])),
                f"{row['shim_vs_stock']:.3f}",
                f"{row['bound_vs_stock']:.3f}",
                row["verdict"],
                " / ".join(
                    "-" if peaks.get(label) is None else f"{peaks[label]:.2f}" for label in QKV_LABELS
                ),
            ]
        )
    return out


def _mean_and_runs(mean: float, runs: Sequence[float]) -> str:
    """``0.2210``, or ``0.2210 (0.2200 / 0.2220)`` when the mean is of several runs."""
    text = f"{mean:.4f}"
    return text if len(runs) < 2 else f"{text} ({' / '.join(f'{r:.4f}' for r in runs)})"


# --------------------------------------------------------------------------------------
# --rl
# --------------------------------------------------------------------------------------


def _ok_runs(
    results: Sequence[Mapping[str, Any]], shape: str, precision: str, path: str
) -> list[Mapping[str, Any]]:
    """A path's finished runs on one row (one per round with ``--rounds``)."""
    return [
        r
        for r in results
        if r.get("status") == "ok" and (r["shape"], r["precision"], r["path"]) == (shape, precision, path)
    ]


def _mean_step(results: Sequence[Mapping[str, Any]], shape: str, precision: str, path: str) -> float | None:
    """A path's step time on one row: the mean of its runs' medians."""
    steps = [r["median_step_s"] for r in _ok_runs(results, shape, precision, path)]
    return sum(steps) / len(steps) if steps else None


def _process_spread(results: Sequence[Mapping[str, Any]], shape: str, precision: str) -> float | None:
    """How far identical processes read apart on one row: the largest slowest-over-fastest
    median among stock's runs and among the shim's (None with one run each)."""
    spreads = []
    for path in ("unsloth", "shim"):
        steps = [r["median_step_s"] for r in _ok_runs(results, shape, precision, path)]
        if len(steps) > 1:
            spreads.append(max(steps) / max(min(steps), 1e-9))
    return max(spreads, default=None)


def _runs_finished(results: Sequence[Mapping[str, Any]], shape: str, precision: str) -> str:
    """``unsloth 1 run, shim 2 runs finished``: a budget can stop a rounds plan short."""
    counts = {path: len(_ok_runs(results, shape, precision, path)) for path in ("unsloth", "shim")}
    return ", ".join(f"{path} {n} run{'s' * (n != 1)}" for path, n in counts.items()) + " finished"


def summarize_rl(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each slice's share of the step, the largest slice, and step-speed ratios to the
    ``hf`` and ``unsloth`` rows of the same shape and precision (their step time over this
    row's: above 1 is faster). With rounds (``--rounds``), a path's step time is the mean of
    its runs, every shim row carries the row's ratio, and ``process_spread`` says how far
    identical processes read apart."""
    rows = []
    for result in results:
        row = dict(result)
        if row.get("status") == "ok":
            step = row["median_step_s"]
            slices = row["slice_median_s"]
            # Slowest over fastest timed step, from every step's record: far above 1, a compile
            # (or another one-off) fell inside the timed steps and the median may carry it.
            timed = [s["step_s"] for s in row.get("rl_steps", []) if not s.get("warmup")]
            if timed:
                row["step_spread"] = max(timed) / max(min(timed), 1e-9)
            row["slice_share"] = {name: slices[name] / step for name in RL_SLICES}
            row["largest_slice"] = max(RL_SLICES, key=lambda name: slices[name])
            key = (row["shape"], row["precision"])
            hf = next(iter(_ok_runs(results, *key, "hf")), None)
            stock = _mean_step(results, *key, "unsloth")
            if hf is not None and row["path"] != "hf":
                row["speed_vs_hf"] = hf["median_step_s"] / step
                if row.get("peak_allocated_gib") and hf.get("peak_allocated_gib"):
                    row["memory_vs_hf"] = row["peak_allocated_gib"] / hf["peak_allocated_gib"]
            if stock is not None and row["path"] == "shim":
                row["shim_vs_unsloth"] = stock / _mean_step(results, *key, "shim")
                spread = _process_spread(results, *key)
                if spread is not None:
                    row["process_spread"] = spread
        rows.append(row)
    return rows


#: A row whose slowest timed step is more than this times its fastest is called unsteady.
RL_STEADY_SPREAD = 1.5


def unsteady_rl_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows whose timed steps differ by more than RL_STEADY_SPREAD (their median is suspect)."""
    return [r for r in rows if r.get("status") == "ok" and r.get("step_spread", 1.0) > RL_STEADY_SPREAD]


def rl_fastest(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per shape and precision, the row of the path with the shortest step (where the time
    goes when the fastest path runs it); rows that did not run are left out."""
    best: dict[tuple[str, str], Mapping[str, Any]] = {}
    for row in rows:
        if row.get("status") != "ok":
            continue
        key = (row["shape"], row["precision"])
        if key not in best or row["median_step_s"] < best[key]["median_step_s"]:
            best[key] = row
    return [dict(row) for row in best.values()]


def rl_split_text(row: Mapping[str, Any]) -> str:
    """``generate 2.10 s (81%), reference 0.12 s (5%), train 0.37 s (14%)``."""
    return ", ".join(
        f"{name} {row['slice_median_s'][name]:.2f} s ({row['slice_share'][name]:.0%})" for name in RL_SLICES
    )


RL_HEADER = (
    "shape",
    "precision",
    "path",
    "prompts x replies x new",
    "step s",
    "generate s",
    "reference s",
    "train s",
    "generated tokens/s",
    "peak GiB",
    "largest slice",
    "speed vs hf",
    "memory vs hf",
    "shim/unsloth",
)


def rl_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    out = []
    for row in rows:
        cells = [
            row["shape"],
            row["precision"],
            row["path"] + (f" #{row['run']}" if row.get("run", 1) > 1 else ""),
            f"{row['batch']} x {row['replies']} x {row['seq_len']}",
        ]
        if row.get("status") != "ok":
            out.append([*cells, "failed (below)", *[""] * (len(RL_HEADER) - len(cells) - 1)])
            continue
        slices = row["slice_median_s"]
        rate = row.get("generated_tokens_per_s")
        out.append(
            [
                *cells,
                f"{row['median_step_s']:.2f}",
                *(f"{slices[name]:.2f}" for name in RL_SLICES),
                "-" if rate is None else f"{rate:,.0f}",
                gib(row.get("peak_allocated_gib")),
                f"{row['largest_slice']} ({row['slice_share'][row['largest_slice']]:.0%})",
                ratio(row.get("speed_vs_hf")),
                ratio(row.get("memory_vs_hf")),
                ratio(row.get("shim_vs_unsloth")),
            ]
        )
    return out


def _rl_markdown(rows: Sequence[Mapping[str, Any]], settings: Settings) -> list[str]:
    sizes = sorted({(r["batch"], r["replies"], r["seq_len"]) for r in rows})
    size = "; ".join(rl_size(*s) for s in sizes) or rl_size(0, 0, 0)
    lines = [
        f"- one step: {size}; {_steps_text(rows, settings)}. The slices, each timed between CUDA "
        "synchronisations: generate = sampling every reply to its full length with the KV cache "
        "through the loader's `generate_replies` (Unsloth: `for_inference`, its fast decoding, "
        "`for_training`); reference = the completions' log-probs under the base, adapter disabled "
        f"(`reference_logits`, no gradients); train = the policy's log-probs with gradients, GRPO's "
        f"loss (group-normalised advantages of a seeded random reward, k3 KL with beta {RL_BETA}), "
        f"backward, one AdamW step. Reference and train run in micro-batches of {RL_MICRO_BATCH} rows",
        "- generated tokens/s = generated tokens / generate seconds over the timed steps; peak = "
        "torch.cuda.max_memory_allocated over the timed steps' slices; speed vs hf: hf's step time over "
        "the row's; shim/unsloth: stock Unsloth's step time over the shim's (above 1: the shim is faster; "
        "with rounds, each path's mean over its runs, on every shim row)",
        "",
        markdown_table(RL_HEADER, rl_rows(rows)),
    ]
    rounds = [r for r in rows if r.get("process_spread") and r["path"] == "shim" and r.get("run", 1) == 1]
    if rounds:
        lines += [
            "",
            "Rounds (stock and the shim alternating, one process per path and round): "
            + "; ".join(
                f"{r['shape']} {r['precision']}: shim/unsloth {r['shim_vs_unsloth']:.2f}x over the runs' "
                f"means, identical processes up to {r['process_spread']:.2f}x apart "
                f"({_runs_finished(rows, r['shape'], r['precision'])})"
                for r in rounds
            ),
        ]
    unsteady = unsteady_rl_rows(rows)
    if unsteady:
        lines += [
            "",
            f"Unsteady rows (slowest timed step over the fastest above {RL_STEADY_SPREAD}: a compile or "
            "another one-off inside the timed steps; more --warmup steps): "
            + ", ".join(
                f"{r['shape']} {r['precision']} {r['path']} ({r['step_spread']:.1f}x)" for r in unsteady
            ),
        ]
    fastest = rl_fastest(rows)
    if fastest:
        lines += [
            "",
            "Where the time goes on the fastest path of each row (median slice, its share of the step):",
            "",
        ]
        for row in fastest:
            peaks = row.get("slice_peak_gib") or {}
            peak_text = ", ".join(f"{name} {gib(peaks.get(name))}" for name in RL_SLICES)
            lines.append(
                f"- {row['shape']} {row['precision']}, {row['path']}: step {row['median_step_s']:.2f} s = "
                f"{rl_split_text(row)}; peak GiB per slice: {peak_text}"
            )
    return lines


# --------------------------------------------------------------------------------------
# Any mode
# --------------------------------------------------------------------------------------

HEADERS = {"train": TRAIN_HEADER, "bisect": BISECT_HEADER, "qkv": QKV_HEADER, "rl": RL_HEADER}


def summarize(kind: str, results: Sequence[dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    """The report's rows for the workers' ``results`` of mode ``kind`` (train | bisect | qkv)."""
    if kind == "train":
        return summarize_train(results)
    if kind == "qkv":
        return summarize_qkv(results, settings.rounds)
    if kind == "rl":
        return summarize_rl(results)
    return list(results)


def table_rows(kind: str, rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return {"train": train_rows, "bisect": bisect_rows, "qkv": qkv_rows, "rl": rl_rows}[kind](rows)


def settings_of(report: Mapping[str, Any]) -> Settings:
    """The :class:`Settings` a written report (``bench.json`` and friends) ran with."""
    return replace(Settings(), **{**report["settings"], "gpus": tuple(report["settings"].get("gpus", ()))})


TITLES = {
    "train": "Training throughput: HF + PEFT, stock Unsloth, Unsloth with the shim",
    "bisect": "Longest trainable sequence without running out of GPU memory",
    "qkv": "Qwen2 fused LoRA QKV with bias: stock, shim, bound (biases dropped)",
    "rl": "RL steps (GRPO-style): generate, reference log-probs, train",
}


def render_markdown(
    kind: str,
    rows: Sequence[Mapping[str, Any]],
    settings: Settings,
    commands: Sequence[str],
    card: str,
    installed: Mapping[str, str | None],
    heading: str = "#",
    title: str | None = None,
) -> str:
    """bench.md / max_seq.md / qkv_bias.md / rl.md: the card, the versions, the command, the table.

    ``heading`` and ``title``: the title's markdown level and text (default the mode's
    title; a section of a larger page takes ``###``).
    """
    peak = peak_bf16_flops(card)
    lines = [
        f"{heading} {title or TITLES[kind]}",
        "",
        f"- card: {card}"
        + (f" (MFU against {peak / 1e12:.0f} TFLOP/s dense bf16)" if kind == "train" and peak else ""),
        "- versions: "
        + ", ".join(f"{name} {version or 'not installed'}" for name, version in installed.items()),
        *(f"- command: `{command}`" for command in commands),
        f"- random-weight checkpoints of Qwen's published shapes; {_inputs_text(kind)}; LoRA r=16, alpha=16, "
        f"dropout 0 on q/k/v/o/gate/up/down; {_checkpointing_text(rows, settings)}; AdamW lr 1e-4; "
        f"qlora = 4-bit NF4, double quant, bf16 compute; {_process_text(rows, settings)}; "
        "PYTORCH_ALLOC_CONF=expandable_segments:True for every path (Unsloth sets it on import)",
    ]
    if settings.gpus:
        lines.append(
            f"- run on GPU {settings.gpus[0]} (`--gpus`)"
            if len(settings.gpus) == 1
            else f"- run on GPUs {','.join(settings.gpus)} at once (`--gpus`): the runs of one row share one "
            "card (`gpu` of each case in the JSON), so its ratios are taken on a single card"
        )
    if kind == "train":
        lines += [
            f"- {_steps_text(rows, settings)}; tokens/s = batch x seq / median step; peak = "
            "torch.cuda.max_memory_allocated over the timed steps",
            f"- {FLOPS_FORMULA}",
            "- speed vs hf and memory vs hf: tokens/s and peak memory over the hf row of the same shape "
            "and precision; shim/unsloth: tokens/s of the shim over stock Unsloth",
            "",
            markdown_table(TRAIN_HEADER, train_rows(rows)),
        ]
        inputs = [row for row in rows if row.get("sdpa_inputs")]
        if inputs:
            lines += [
                "",
                "What the hf path handed `scaled_dot_product_attention` (calls by query dtype, GQA, mask):",
                "",
            ]
            lines += [f"- {row['shape']} {row['precision']}: {_counts(row['sdpa_inputs'])}" for row in inputs]
    elif kind == "bisect":
        lines += [
            f"- bisection over {settings.bisect_low}..{settings.bisect_high} tokens in steps of "
            f"{settings.bisect_step}, one training step per probe (forward, backward, AdamW), one process "
            "per path; a probe that runs out of memory frees the cache and the search goes on",
            "- probes: length then + (trained) or x (out of memory), in the order tried",
            "",
            markdown_table(BISECT_HEADER, bisect_rows(rows)),
        ]
    elif kind == "rl":
        lines += _rl_markdown(rows, settings)
    else:
        lines += [
            f"- step time: {_steps_text(rows, settings)}; runs in "
            f"this order: {_qkv_order(settings.rounds)}; stock: UNSLOTH_QWEN_COMPAT_DISABLE=1; bound: stock "
            "Unsloth with every q/k/v bias set to None before LoRA is attached (a different model, but it "
            "shows what the fused kernel buys)",
            "- each of stock, shim, bound: the mean of its runs' medians; ratios against stock; "
            "gap closed = (stock - shim) / (stock - bound); peak: the largest of a label's runs",
            "",
            markdown_table(QKV_HEADER, qkv_rows(rows)),
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
    return ", ".join(case.run_name for case in qkv_cases(Case("train", "", "", "", 0, 0), rounds))


def _steps_text(rows: Sequence[Mapping[str, Any]], settings: Settings) -> str:
    used = {(r["warmup"], r["steps"]) for r in rows if "steps" in r} or {(settings.warmup, settings.steps)}
    if len(used) > 1:
        return "warm-up and timed steps differ between the merged runs (see each case in the JSON)"
    warmup, steps = used.pop()
    return f"{_count(warmup, 'warm-up step')}, then the median of {_count(steps, 'timed step')}"


def _inputs_text(kind: str) -> str:
    if kind == "rl":
        return "chat prompts rendered with Qwen's template, replies sampled from the model"
    return "random token ids"


def _process_text(rows: Sequence[Mapping[str, Any]], settings: Settings) -> str:
    used = {r.get("process_per", "case") for r in rows if "steps" in r} or {settings.process_per}
    if used == {"case"}:
        return "each run in a process of its own"
    if used == {"shape"}:
        return (
            "one process per path and shape, running that shape's precisions in turn (`--process-per "
            "shape`: Unsloth's import paid once per process; paths never share a process)"
        )
    if used == {"path"}:
        return (
            "one process per path, running all of its cases in turn (`--process-per path`: Unsloth's "
            "import paid once per process; paths never share a process)"
        )
    return "a process per run or per path and shape, differing between the merged runs (see the JSON)"


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
