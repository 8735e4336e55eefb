"""``python -m unsloth_qwen_compat bench``: the plan, the shapes, the arithmetic, the reports,
and the worker pipeline end to end on CPU (hf path, a tiny shape).

The GPU numbers themselves come from running the command on a GPU; here every piece that
does not need one is checked, including a real worker process per path.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from unsloth_qwen_compat import bench, cli
from unsloth_qwen_compat.bench import (
    SHAPES,
    Case,
    Settings,
    Shape,
    chart,
    checkpoints,
    command,
    planning,
    report,
    runner,
    worker,
    workload,
)

# --------------------------------------------------------------------------------------
# Arguments and the plan


def _dry_run(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert bench.main(["--dry-run", *args]) == 0
    return capsys.readouterr().out.splitlines()


def test_dry_run_lists_checkpoints_then_one_case_per_shape_precision_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lines = _dry_run(capsys, "--cache-dir", str(tmp_path))
    assert [line.split(":")[0] for line in lines[:2]] == ["checkpoint qwen3-1.7b", "checkpoint qwen2.5-1.5b"]
    assert all("(to build)" in line and str(tmp_path) in line for line in lines[:2])
    cases = [line for line in lines if line.startswith("[")]
    assert len(cases) == 12
    assert cases[0] == "[1/12] qwen3-1.7b bf16 hf: batch 4 x 2048, 2 warm-up + 6 timed steps"
    assert [c.split()[3].rstrip(":") for c in cases[:3]] == ["hf", "unsloth", "shim"]
    assert cases[-1].startswith("[12/12] qwen2.5-1.5b qlora shim:")
    assert lines[-1].startswith("12 cases, each in its own process")


def test_the_cli_has_a_bench_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "--dry-run", "--shapes", "qwen3-8b", "--paths", "hf", "--precisions", "qlora"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "[1/1] qwen3-8b qlora hf: batch 4 x 2048" in out


def _plan(*args: str) -> tuple[list[Case], Settings]:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench.plan(parser.parse_args(list(args)))


def test_per_shape_batches_and_options() -> None:
    cases, settings = _plan(
        "--shapes", "qwen3-1.7b,qwen3-8b", "--paths", "shim", "--batch", "4,qwen3-8b=1", "--seq-len", "1024",
        "--steps", "8", "--warmup", "1",
    )  # fmt: skip
    assert [(c.shape, c.precision, c.batch, c.seq_len) for c in cases] == [
        ("qwen3-1.7b", "bf16", 4, 1024),
        ("qwen3-1.7b", "qlora", 4, 1024),
        ("qwen3-8b", "bf16", 1, 1024),
        ("qwen3-8b", "qlora", 1, 1024),
    ]
    assert (settings.steps, settings.warmup) == (8, 1)
    assert planning.parse_batch("2") == (2, {})
    assert planning.parse_batch("qwen2.5-7b=2") == (0, {"qwen2.5-7b": 2})


def test_max_seq_bisect_defaults_to_qwen3_8b_qlora_batch_1_one_process_per_path() -> None:
    cases, settings = _plan("--max-seq-bisect")
    assert [(c.mode, c.shape, c.precision, c.path, c.batch) for c in cases] == [
        ("bisect", "qwen3-8b", "qlora", path, 1) for path in ("hf", "unsloth", "shim")
    ]
    assert (settings.bisect_low, settings.bisect_high, settings.bisect_step) == (1024, 131072, 1024)
    cases, _ = _plan(
        "--max-seq-bisect", "--shapes", "qwen3-1.7b", "--precisions", "bf16", "--bisect-high", "8192"
    )
    assert {(c.shape, c.precision, c.seq_len) for c in cases} == {("qwen3-1.7b", "bf16", 8192)}


def test_qkv_bias_compare_runs_stock_shim_bound_stock_in_that_order() -> None:
    cases, _ = _plan("--qkv-bias-compare")
    assert [c.shape for c in cases] == ["qwen2.5-1.5b"] * 8 + ["qwen2.5-7b"] * 8
    first = cases[:4]
    assert [(c.label, c.path, c.drop_qkv_bias, c.run) for c in first] == [
        ("stock", "unsloth", False, 1),
        ("shim", "shim", False, 1),
        ("bound", "unsloth", True, 1),
        ("stock", "unsloth", False, 2),
    ]
    assert len({c.id for c in cases}) == len(cases)  # every run has its own log and result file


def test_qkv_bias_compare_batch_is_12_at_the_small_shape_unless_given() -> None:
    cases, _ = _plan("--qkv-bias-compare")
    assert {(c.shape, c.batch) for c in cases} == {("qwen2.5-1.5b", 12), ("qwen2.5-7b", 4)}
    cases, _ = _plan("--qkv-bias-compare", "--batch", "4")  # an explicit --batch replaces it
    assert {c.batch for c in cases} == {4}
    cases, _ = _plan("--shapes", "qwen2.5-1.5b")  # the main table keeps batch 4
    assert {c.batch for c in cases} == {4}


def test_qkv_rounds_alternate_the_order_so_drift_falls_on_every_label() -> None:
    cases, settings = _plan(
        "--qkv-bias-compare", "--shapes", "qwen2.5-1.5b", "--precisions", "bf16", "--rounds", "2"
    )
    assert settings.rounds == 2
    assert [(c.label, c.run) for c in cases] == [
        ("stock", 1), ("shim", 1), ("bound", 1), ("bound", 2), ("shim", 2), ("stock", 2),
    ]  # fmt: skip
    three = planning.qkv_cases(cases[0], 3)
    assert [c.label for c in three] == [
        "stock",
        "shim",
        "bound",
        "bound",
        "shim",
        "stock",
        "stock",
        "shim",
        "bound",
    ]
    assert len({c.id for c in three}) == 9


def test_card_groups_keep_a_rows_runs_together_and_bisections_apart() -> None:
    cases, _ = _plan("--qkv-bias-compare")
    groups = runner.card_groups(cases)
    assert [(g[0].shape, g[0].precision, len(g)) for g in groups] == [
        ("qwen2.5-1.5b", "bf16", 4), ("qwen2.5-1.5b", "qlora", 4), ("qwen2.5-7b", "bf16", 4), ("qwen2.5-7b", "qlora", 4),
    ]  # fmt: skip
    assert [c for g in groups for c in g] == cases  # same order inside a group
    bisections, _ = _plan("--max-seq-bisect")
    assert [len(g) for g in runner.card_groups(bisections)] == [1, 1, 1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shapes", "qwen3-70b"], "unknown qwen3-70b"),
        (["--paths", "hf,vllm"], "unknown vllm"),
        (["--batch", "four"], "not N or SHAPE=N"),
        (["--batch", "llama=2"], "unknown shape 'llama'"),
        (["--qkv-bias-compare", "--shapes", "qwen3-1.7b"], "needs Qwen2 shapes"),
        (["--qkv-bias-compare", "--paths", "hf"], "drop --paths"),
        (["--steps", "0"], "--steps must be positive"),
        (["--rounds", "0", "--qkv-bias-compare"], "--rounds must be positive"),
        (["--rounds", "2"], "--rounds applies to --qkv-bias-compare and --rl only"),
        (["--gpus", "0,x"], "give CUDA device indices"),
        (["--gpus", "1,1"], "an index is repeated"),
    ],
)
def test_bad_arguments_exit_2_with_the_problem(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert bench.main(["--dry-run", *args]) == 2
    assert message in capsys.readouterr().err


def test_without_a_gpu_it_exits_2_and_says_a_gpu_is_needed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(command, "_gpu_name", lambda: None)
    assert bench.main(["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--dry-run" in err
    assert not (tmp_path / "out").exists()  # nothing ran


# --------------------------------------------------------------------------------------
# Shapes, FLOPs, MFU


def _meta_model(shape: Shape) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(workload.build_config(shape))


#: Model cards' "Number of Parameters" and "(Non-Embedding)"; Qwen3-1.7B's checkpoint on
#: the hub also stores the (tied) output head, 2.03B counted that way.
PUBLISHED = {
    "qwen3-1.7b": (1.7e9, 1.4e9),
    "qwen3-8b": (8.2e9, 6.95e9),
    "qwen2.5-1.5b": (1.54e9, 1.31e9),
    "qwen2.5-7b": (7.61e9, 6.53e9),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_shapes_match_the_published_sizes(name: str) -> None:
    shape = SHAPES[name]
    model = _meta_model(shape)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    non_embedding = total - embedding - (0 if shape.tie_word_embeddings else head)
    published, published_non_embedding = PUBLISHED[name]
    assert shape.published_params == published
    assert abs(total / published - 1) < 0.02, total
    assert abs(non_embedding / published_non_embedding - 1) < 0.02, non_embedding
    if name == "qwen3-1.7b":
        assert abs((total + head) / 2.03e9 - 1) < 0.02
    config = model.config
    assert config.model_type == shape.model_type
    assert config.tie_word_embeddings is shape.tie_word_embeddings
    assert (model.model.layers[0].self_attn.q_proj.bias is not None) is shape.attention_bias
    assert model.model.layers[0].self_attn.head_dim == 128
    assert config.rms_norm_eps == 1e-6
    assert (config.rope_parameters or {}).get("rope_theta", getattr(config, "rope_theta", None)) == 1e6
    # N of the MFU formula is exactly the weights of every linear layer, output head included.
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert bench.matmul_params(shape) == linear


def test_lora_params_is_what_peft_trains() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shape = SHAPES["tiny-qwen2"]
    model = AutoModelForCausalLM.from_config(workload.build_config(shape))
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=list(workload.LORA_TARGETS)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert bench.lora_params(shape) == trainable == 131072


def test_flops_per_token_and_mfu_on_a_worked_example() -> None:
    # hidden 4, 2 heads x 2 = 4 query dims, 1 kv head x 2 = 2, intermediate 8, vocab 10, 2 layers.
    shape = Shape("worked", "qwen3", 4, 8, 2, 2, 1, 2, 10, 64, False)
    # per layer q 4x4 + k 4x2 + v 4x2 + o 4x4 + gate, up, down 3 x 4x8 = 144; 2 layers + head 4x10
    assert bench.matmul_params(shape) == 2 * 144 + 40 == 328
    # LoRA r=1: per layer (4+4) + (4+2) + (4+2) + (4+4) + 3 x (4+8) = 64
    assert bench.lora_params(shape, r=1) == 128
    # 4N + 6 N_lora + 12 L H d S at S = 8
    assert bench.flops_per_token(shape, 8, r=1) == 4 * 328 + 6 * 128 + 12 * 2 * 2 * 2 * 8 == 2848
    # r=16, S=2048: 4N + 6 N_lora + 12 L H d S
    expected = 4 * 328 + 6 * 16 * 128 + 12 * 2 * 2 * 2 * 2048
    assert bench.flops_per_token(shape, 2048) == expected
    assert bench.mfu(shape, 2048, 1e9, "NVIDIA H100 80GB HBM3") == pytest.approx(expected * 1e9 / 989e12)
    assert bench.mfu(shape, 2048, 1e9, "Tesla T4") is None


def test_mfu_of_qwen3_1_7b_at_a_given_throughput() -> None:
    shape = SHAPES["qwen3-1.7b"]
    n = 28 * (2048 * 2048 * 2 + 2048 * 1024 * 2 + 3 * 2048 * 6144) + 2048 * 151936
    assert bench.matmul_params(shape) == n == 1_720_451_072
    lora = 28 * 16 * (2 * (2048 + 2048) + 2 * (2048 + 1024) + 3 * (2048 + 6144))
    per_token = 4 * n + 6 * lora + 12 * 28 * 16 * 128 * 2048
    assert bench.flops_per_token(shape, 2048) == per_token
    # A made-up 30,000 tokens/s on an H200 would be about 25% MFU.
    assert bench.mfu(shape, 2048, 30_000, "NVIDIA H200") == pytest.approx(30_000 * per_token / 989e12)
    assert 0.25 < bench.mfu(shape, 2048, 30_000, "NVIDIA H200") < 0.26


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA GeForce RTX 4090", None),
        (None, None),
    ],
)
def test_peak_flops_table(name: str | None, peak: float | None) -> None:
    assert bench.peak_bf16_flops(name) == peak


# --------------------------------------------------------------------------------------
# Bisection and the gap closed


def _counting(limit: int) -> tuple[list[int], object]:
    probed: list[int] = []

    def fits(n: int) -> bool:
        probed.append(n)
        return n <= limit

    return probed, fits


@pytest.mark.parametrize("limit", [1024, 1500, 36864, 37000, 65535, 130048, 131071])
def test_longest_fitting_finds_the_last_length_that_fits(limit: int) -> None:
    probed, fits = _counting(limit)
    found = bench.longest_fitting(fits, 1024, 131072, 1024)
    assert found == limit // 1024 * 1024
    assert len(probed) <= 2 + math.ceil(math.log2(128))  # both ends, then halving 128 candidates
    assert len(set(probed)) == len(probed)  # never the same length twice


def test_longest_fitting_ends() -> None:
    probed, fits = _counting(10**9)
    assert bench.longest_fitting(fits, 1024, 131072, 1024) == 131072
    assert probed == [1024, 131072]  # a path that fits everything costs two probes
    probed, fits = _counting(100)
    assert bench.longest_fitting(fits, 1024, 131072, 1024) is None
    assert probed == [1024]
    probed, fits = _counting(10**9)
    assert bench.longest_fitting(fits, 2048, 2048, 1024) == 2048
    assert probed == [2048]  # one candidate, one probe
    with pytest.raises(ValueError):
        bench.longest_fitting(lambda n: True, 4096, 1024, 1024)


def test_gap_closed() -> None:
    # stock 0.2425 and 0.2414 (mean 0.24195), shim 0.2200, bound 0.2173
    assert bench.gap_closed([0.2425, 0.2414], 0.2200, 0.2173) == pytest.approx(0.02195 / 0.02465)
    assert bench.gap_closed([1.0, 1.0], 0.9, 0.8) == pytest.approx(0.5)
    assert bench.gap_closed([1.0], 0.8, 0.8) == pytest.approx(1.0)
    assert bench.gap_closed([1.0], 1.05, 0.8) == pytest.approx(-0.25)  # the shim made it slower
    assert bench.gap_closed([1.0, 1.0], 0.9, 1.0) is None  # nothing to close


# --------------------------------------------------------------------------------------
# Reports from fake worker results


def _result(path: str, tokens_per_s: float, peak: float, **extra: object) -> dict:
    case = Case("train", "qwen3-1.7b", "bf16", path, 4, 2048)
    tokens = 4 * 2048
    return {
        **asdict(case),
        "id": case.id,
        "status": "ok",
        "device_name": "NVIDIA H200",
        "median_step_s": tokens / tokens_per_s,
        "tokens_per_s": tokens_per_s,
        "peak_allocated_gib": peak,
        **extra,
    }


def test_train_report_has_ratios_mfu_versions_command_and_failures() -> None:
    results = [
        _result("hf", 10_000, 20.0),
        _result("unsloth", 20_000, 5.0),
        _result("shim", 22_000, 5.0),
        {**asdict(Case("train", "qwen3-8b", "qlora", "hf", 1, 2048)), "id": "train-qwen3-8b-qlora-hf"}
        | {"status": "failed", "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"},
    ]
    rows = report.summarize_train(results)
    hf, unsloth, shim, failed = rows
    assert "speed_vs_hf" not in hf
    assert unsloth["speed_vs_hf"] == pytest.approx(2.0) and unsloth["memory_vs_hf"] == pytest.approx(0.25)
    assert shim["speed_vs_hf"] == pytest.approx(2.2) and shim["shim_vs_unsloth"] == pytest.approx(1.1)
    assert hf["mfu"] == pytest.approx(10_000 * bench.flops_per_token(SHAPES["qwen3-1.7b"], 2048) / 989e12)
    command = "python -m unsloth_qwen_compat bench --shapes qwen3-1.7b,qwen3-8b"
    versions = {"torch": "2.11.0", "transformers": "5.17.0", "peft": "0.18.0", "unsloth": "2026.10.9"}
    text = report.render_markdown("train", rows, Settings(), [command], "NVIDIA H200", versions)
    assert "- card: NVIDIA H200 (MFU against 989 TFLOP/s dense bf16)" in text
    assert "torch 2.11.0, transformers 5.17.0, peft 0.18.0, unsloth 2026.10.9" in text
    assert f"`{command}`" in text
    assert "4 N + 6 N_lora + 12 L H d S" in text
    table = [line for line in text.splitlines() if line.startswith("| qwen3")]
    assert table[0].startswith("| qwen3-1.7b | bf16 | hf | 4 x 2048 | 0.819 | 10,000 | 20.0 |")
    assert table[1].endswith("| 2.00x | 0.25x | - |")
    assert table[2].endswith("| 2.20x | 0.25x | 1.10x |")
    assert table[3].startswith("| qwen3-8b | qlora | hf | 1 x 2048 | failed (below) |")
    assert "failed: train-qwen3-8b-qlora-hf: OutOfMemoryError: CUDA out of memory." in text


def test_bisect_report() -> None:
    case = Case("bisect", "qwen3-8b", "qlora", "unsloth", 1, 8192)
    probes = [
        {"seq_len": n, "fits": n <= 5120, "seconds": 2.0, "tokens": n, "peak_allocated_gib": 30.0}
        for n in (1024, 8192, 4096, 6144, 5120)
    ]
    row = {**asdict(case), "id": case.id, "status": "ok", "longest": 5120, "probes": probes}
    row["bisect"] = {"low": 1024, "high": 8192, "step": 1024}
    top = {**row, "longest": 8192, "probes": probes[:2]}
    none = {**row, "longest": None, "probes": probes[:1]}
    lines = report.bisect_rows([row, top, none])
    assert lines[0][4:] == ["5120", "2,560", "30.0", "1024+ 8192x 4096+ 6144x 5120+"]
    assert lines[1][4] == ">= 8192 (upper bound)"
    assert lines[2][4] == "< 1024"
    text = report.render_markdown("bisect", [row], Settings(bisect_high=8192), ["cmd"], "NVIDIA H200", {})
    assert "bisection over 1024..8192 tokens in steps of 1024" in text


def _qkv_run(label: str, run: int, seconds: float | None, **extra: object) -> dict:
    case = Case(
        "train", "qwen2.5-1.5b", "bf16", "shim" if label == "shim" else "unsloth", 4, 2048, label, run
    )
    status = {"status": "ok", "median_step_s": seconds} if seconds else {"status": "failed", "error": "boom"}
    return {**asdict(case), "id": case.id, **status, **extra}


def test_qkv_report_uses_the_mean_of_both_stock_runs() -> None:
    results = [
        _qkv_run("stock", 1, 0.2425, apply_qkv={"original_apply_qkv": 28}),
        _qkv_run(
            "shim", 1, 0.2200, apply_qkv={"apply_lora_qkv": 28}, patches={"qwen2_fused_qkv_bias": "applied"}
        ),
        _qkv_run("bound", 1, 0.2173, apply_qkv={"apply_lora_qkv": 28}),
        _qkv_run("stock", 2, 0.2414),
    ]
    (row,) = report.summarize_qkv(results, 1)
    assert row["stock_s"] == [0.2425, 0.2414]
    assert row["shim_vs_stock"] == pytest.approx(0.2200 / 0.24195)
    assert row["bound_vs_stock"] == pytest.approx(0.2173 / 0.24195)
    assert row["gap_closed"] == pytest.approx(0.02195 / 0.02465)
    assert row["shim_patch_action"] == "applied"
    cells = report.qkv_rows([row])[0]
    assert cells[2:] == ["0.2425 / 0.2414", "0.2200", "0.2173", "0.909", "0.898", "0.89 (met)", "- / - / -"]
    assert "gap closed (target >= 0.80)" in report.QKV_HEADER
    text = report.render_markdown("qkv", [row], Settings(), ["cmd"], "NVIDIA H200", {})
    assert "apply_lora_qkv x28" in text and "shim patch: applied" in text

    # Stock runs 0.2369 and 0.2879 s: further apart than their mean is from the bound.
    noisy = report.summarize_qkv(
        [_qkv_run("stock", 1, 0.2369), *results[1:3], _qkv_run("stock", 2, 0.2879)], 1
    )
    assert noisy[0]["gap_within_noise"] is True
    assert report.qkv_rows(noisy)[0][-2].startswith(
        "not resolved: runs of one label differ by up to 0.0510 s, stock - bound is +0.0451 s"
    )
    slower = report.summarize_qkv([*results[:2], _qkv_run("bound", 1, 0.2500), results[3]], 1)
    assert report.qkv_rows(slower)[0][-2] == "n/a (bound not faster)"

    broken = report.summarize_qkv([*results[:3], _qkv_run("stock", 2, None)], 1)
    assert broken[0]["status"] == "failed" and "stock: boom" in broken[0]["error"]


def test_png_is_written_or_skipped_with_a_message(tmp_path: Path) -> None:
    rows = report.summarize_train([_result("hf", 10_000, 20.0), _result("unsloth", 20_000, 5.0)])
    why = chart.write_png(rows, tmp_path / "bench.png")
    if why is None:
        assert (tmp_path / "bench.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed" in why and not (tmp_path / "bench.png").exists()


def _fake_worker(spec: dict, work: Path, log: Path, timeout: float, gpu: str | None = None) -> dict:
    """Stands in for the worker process: what each mode's worker returns on a GPU."""
    if spec["mode"] == "prepare":
        Path(spec["checkpoint"]).mkdir(parents=True)
        (Path(spec["checkpoint"]) / "COMPLETE").write_text("ok")
        return {"status": "ok"}
    if spec["shape"] == "qwen3-8b" and spec["path"] == "hf":
        return {"status": "failed", "error": "OutOfMemoryError: CUDA out of memory."}
    speed = {"hf": 1.0, "unsloth": 2.0, "shim": 2.2}[spec["path"]]
    if spec["mode"] == "bisect":
        longest = int(8192 * speed) // 1024 * 1024
        probes = [
            {"seq_len": longest, "fits": True, "seconds": 1.0, "tokens": longest, "peak_allocated_gib": 9.0}
        ]
        return {"status": "ok", "device_name": "NVIDIA H200", "longest": longest, "probes": probes}
    tokens = spec["batch"] * spec["seq_len"]
    step = {"stock": 0.3, "shim": 0.27, "bound": 0.25}.get(spec["label"], 0.3 / speed)
    return {
        "status": "ok",
        "device_name": "NVIDIA H200",
        "median_step_s": step,
        "tokens_per_s": tokens / step,
        "peak_allocated_gib": 10 / speed,
    }


@pytest.mark.parametrize(
    ("args", "stem", "expected"),
    [
        (["--shapes", "qwen3-1.7b"], "bench", "| qwen3-1.7b | qlora | shim | 4 x 2048 | 0.136 |"),
        (["--max-seq-bisect"], "max_seq", "| qwen3-8b | qlora | shim | 1 | 17408 |"),
        (
            ["--qkv-bias-compare", "--shapes", "qwen2.5-1.5b"],
            "qkv_bias",
            "| 0.3000 / 0.3000 | 0.2700 | 0.2500 | 0.900 | 0.833 | 0.60 (not met) |",
        ),
    ],
)
def test_every_mode_reports_what_its_workers_returned(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    args: list[str],
    stem: str,
    expected: str,
) -> None:
    monkeypatch.setattr(command, "_gpu_name", lambda: "NVIDIA H200")
    monkeypatch.setattr(runner, "run_worker", _fake_worker)
    out = tmp_path / "out"
    code = bench.main([*args, "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    report = json.loads((out / f"{stem}.json").read_text())
    text = (out / f"{stem}.md").read_text()
    assert expected in text, text
    assert report["card"] == "NVIDIA H200" and report["commands"][0].startswith(
        "python -m unsloth_qwen_compat bench"
    )
    failed = [c for c in report["cases"] if c["status"] != "ok"]
    assert code == (1 if failed else 0)
    assert [c["id"] for c in failed] == (["bisect-qwen3-8b-qlora-hf"] if stem == "max_seq" else [])
    assert capsys.readouterr().out.splitlines()[0].startswith("shape")


def test_gpus_run_rows_at_once_each_rows_runs_on_one_card_in_order(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[str, str | None, str]] = []
    lock = threading.Lock()
    both_busy = threading.Event()
    busy: set[str | None] = set()

    def worker(spec: dict, work: Path, log: Path, timeout: float, gpu: str | None = None) -> dict:
        with lock:
            calls.append((spec["id"], gpu, work.name))
        if spec["mode"] != "prepare":
            with lock:
                busy.add(gpu)
                if len(busy) == 2:
                    both_busy.set()
            both_busy.wait(timeout=5)  # the other card's row runs meanwhile
        time.sleep(0.01)
        with lock:
            busy.discard(gpu)
        return _fake_worker(spec, work, log, timeout, gpu)

    monkeypatch.setattr(command, "_gpu_name", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(command, "_gpu_count", lambda: 2)
    monkeypatch.setattr(runner, "run_worker", worker)
    out = tmp_path / "out"
    args = ["--qkv-bias-compare", "--gpus", "0,1", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert bench.main(args) == 0
    assert both_busy.is_set()
    report = json.loads((out / "qkv_bias.json").read_text())
    cases = [c for c in report["cases"]]
    assert [c["id"] for c in cases] == [c.id for c in _plan("--qkv-bias-compare")[0]]  # plan order kept
    for row in runner.card_groups(_plan("--qkv-bias-compare")[0]):
        cards = {c["gpu"] for c in cases if c["id"] in {r.id for r in row}}
        assert len(cards) == 1, cards
        ran = [i for i, _, _ in calls if i in {r.id for r in row}]
        assert ran == [r.id for r in row]  # in order on its card
    assert {gpu for _, gpu, _ in calls} == {"0", "1"}
    assert all(work == f"gpu{gpu}" for _, gpu, work in calls)  # a compiled cache per card
    assert "run on GPUs 0,1 at once" in (out / "qkv_bias.md").read_text()


def test_gpus_beyond_the_machine_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(command, "_gpu_count", lambda: 2)
    monkeypatch.setattr(command, "_gpu_name", lambda: "NVIDIA H200")
    assert bench.main(["--gpus", "0,2", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path)]) == 2
    assert "names a GPU this machine does not have (it sees 2)" in capsys.readouterr().err


def test_reports_are_written_after_every_case_so_a_stopped_run_keeps_its_results(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[str] = []

    def worker(spec: dict, work: Path, log: Path, timeout: float, gpu: str | None = None) -> dict:
        if spec["mode"] != "prepare":
            seen.append(spec["id"])
            if len(seen) == 3:
                raise KeyboardInterrupt  # the job's time limit, say
        return _fake_worker(spec, work, log, timeout, gpu)

    monkeypatch.setattr(command, "_gpu_name", lambda: "NVIDIA H200")
    monkeypatch.setattr(runner, "run_worker", worker)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        bench.main(
            [
                "--qkv-bias-compare",
                "--shapes",
                "qwen2.5-1.5b",
                "--out",
                str(out),
                "--cache-dir",
                str(tmp_path),
            ]
        )
    report = json.loads((out / "qkv_bias.json").read_text())
    assert [c["label"] for c in report["cases"]] == ["stock", "shim"]
    assert report["rows"][0]["status"] == "incomplete"
    assert "| qwen2.5-1.5b | bf16 | running |" in (out / "qkv_bias.md").read_text()


def test_qkv_report_with_rounds_averages_every_labels_runs() -> None:
    results = [
        _qkv_run("stock", 1, 0.30),
        _qkv_run("shim", 1, 0.27),
        _qkv_run("bound", 1, 0.25),
        _qkv_run("bound", 2, 0.27),
        _qkv_run("shim", 2, 0.29),
        _qkv_run("stock", 2, 0.32),
    ]
    (row,) = report.summarize_qkv(results, 2)
    assert row["stock_s"] == [0.30, 0.32] and row["shim_runs_s"] == [0.27, 0.29]
    assert row["shim_s"] == pytest.approx(0.28) and row["bound_s"] == pytest.approx(0.26)
    assert row["gap_closed"] == pytest.approx((0.31 - 0.28) / (0.31 - 0.26))
    cells = report.qkv_rows([row])[0]
    assert cells[3] == "0.2800 (0.2700 / 0.2900)" and cells[4] == "0.2600 (0.2500 / 0.2700)"
    text = report.render_markdown("qkv", [row], Settings(rounds=2), ["cmd"], "NVIDIA H200", {})
    assert "this order: stock, shim, bound, bound #2, shim #2, stock #2" in text


#: Step times that close 0.94 of the gap when every planned run is there (stock 0.61, bound 0.57).
_STEADY = {"stock": 0.6090, "shim": 0.5732, "bound": 0.5709}


def _steady_runs(*names: str, **extra: object) -> list[dict]:
    return [
        _qkv_run(label, int(run or 1), _STEADY[label], **extra)
        for label, _, run in (name.partition("#") for name in names)
    ]


@pytest.mark.parametrize(
    ("rounds", "runs", "verdict"),
    [
        (1, ["stock", "shim", "bound", "stock#2"], "0.94 (met)"),
        (2, ["stock", "shim", "bound", "bound#2", "shim#2", "stock#2"], "0.94 (met)"),
        # The closing stock run was cut off (a time limit): the numbers are there, the verdict is not.
        (1, ["stock", "shim", "bound"], "not resolved: stock #2 did not run"),
        (2, ["stock", "shim", "bound", "bound#2", "shim#2"], "not resolved: stock #2 did not run"),
        (2, ["stock", "shim", "bound", "bound#2"], "not resolved: shim #2, stock #2 did not run"),
        (3, ["stock", "shim", "bound", "bound#2", "shim#2", "stock#2"], "not resolved: stock #3, "),
    ],
)
def test_qkv_verdict_needs_every_planned_run(rounds: int, runs: list[str], verdict: str) -> None:
    (row,) = report.summarize_qkv(_steady_runs(*runs), rounds)
    assert row["status"] == "ok" and row["gap_closed"] == pytest.approx(0.94, abs=0.01)
    assert row["verdict"].startswith(verdict), row["verdict"]
    assert report.qkv_rows([row])[0][-2] == row["verdict"]
    if "not resolved" in verdict:
        assert row["verdict"].endswith(
            "(the plan's stock runs bracket drift over the run); 0.94 from the runs there are"
        )
        assert "met" not in row["verdict"]


def test_qkv_verdict_reads_the_rounds_each_case_recorded() -> None:
    # Merged with --append: a 2-round comparison judged beside a 1-round plan.
    two_rounds = _steady_runs("stock", "shim", "bound", "bound#2", "shim#2", "stock#2", rounds=2)
    assert report.summarize_qkv(two_rounds, 1)[0]["verdict"] == "0.94 (met)"
    cut = _steady_runs("stock", "shim", "bound", "bound#2", "shim#2", rounds=2)
    assert report.summarize_qkv(cut, 1)[0]["verdict"].startswith("not resolved: stock #2 did not run")
    cases, settings = _plan("--qkv-bias-compare", "--rounds", "2")
    assert runner.case_spec(cases[0], settings, Path("/c"))["rounds"] == 2
    assert "rounds" not in runner.case_spec(_plan()[0][0], settings, Path("/c"))


def test_append_merges_runs_into_one_table(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(command, "_gpu_name", lambda: "NVIDIA H200")
    monkeypatch.setattr(runner, "run_worker", _fake_worker)
    common = ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--append"]
    assert bench.main(["--shapes", "qwen3-1.7b", "--paths", "hf,unsloth", *common]) == 0
    assert bench.main(["--shapes", "qwen3-1.7b", "--paths", "shim", "--precisions", "bf16", *common]) == 0
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [c["id"].removeprefix("train-qwen3-1.7b-") for c in report["cases"]] == [
        "bf16-hf", "bf16-unsloth", "qlora-hf", "qlora-unsloth", "bf16-shim",
    ]  # fmt: skip
    assert len(report["commands"]) == 2
    shim = next(r for r in report["rows"] if r["path"] == "shim")
    assert shim["speed_vs_hf"] == pytest.approx(2.2) and shim["shim_vs_unsloth"] == pytest.approx(1.1)


# --------------------------------------------------------------------------------------
# Workers


def test_a_worker_that_dies_without_a_result_is_recorded_as_failed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    crash = "import sys; print('loading...'); print('Segmentation fault in kernel', file=sys.stderr); sys.exit(139)"
    monkeypatch.setattr(runner, "worker_command", lambda spec_path: [sys.executable, "-c", crash])
    spec = {"id": "case", "path": "hf", "device": "cpu"}
    result = runner.run_worker(spec, tmp_path / "work", tmp_path / "logs" / "case.log", timeout=60)
    assert result == {
        "status": "failed",
        "error": "worker exited 139 without a result: Segmentation fault in kernel",
    }
    monkeypatch.setattr(
        runner, "worker_command", lambda spec_path: [sys.executable, "-c", "import time; time.sleep(30)"]
    )
    result = runner.run_worker(spec, tmp_path / "work", tmp_path / "logs" / "case.log", timeout=1)
    assert result["status"] == "failed" and "timed out" in result["error"]


def test_worker_environment_per_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNSLOTH_QWEN_COMPAT_DISABLE", "1")
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    stock, shim = runner.worker_env("unsloth", "cuda"), runner.worker_env("shim", "cuda")
    assert stock["UNSLOTH_QWEN_COMPAT_DISABLE"] == "1" and "UNSLOTH_QWEN_COMPAT_DISABLE" not in shim
    assert stock["PYTORCH_ALLOC_CONF"] == shim["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert stock["PYTHONPATH"].split(":")[0] == str(runner.PACKAGE_ROOT)
    assert runner.worker_env("hf", "cpu")["CUDA_VISIBLE_DEVICES"] == ""
    # The fused QKV patch is on by default: the shim path runs it without setting anything,
    # and a caller's off switch reaches the worker as it is.
    monkeypatch.delenv("UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS", raising=False)
    for path in ("shim", "unsloth", "hf"):
        assert "UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS" not in runner.worker_env(path, "cuda")
    monkeypatch.setenv("UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS", "0")
    assert runner.worker_env("shim", "cuda")["UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS"] == "0"


def test_the_shim_path_switches_opt_in_speed_patches_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import unsloth_qwen_compat.patches as patches

    class OptIn:
        opt_in_env = "UNSLOTH_QWEN_COMPAT_TEST_OPT_IN"

    monkeypatch.setattr(patches, "all_patches", lambda: [OptIn()])
    monkeypatch.delenv(OptIn.opt_in_env, raising=False)
    assert runner.worker_env("shim", "cuda")[OptIn.opt_in_env] == "1"
    assert OptIn.opt_in_env not in runner.worker_env("unsloth", "cuda")
    assert OptIn.opt_in_env not in runner.worker_env("hf", "cuda")
    monkeypatch.setenv(OptIn.opt_in_env, "0")  # the caller's explicit "0" still turns it off
    assert runner.worker_env("shim", "cuda")[OptIn.opt_in_env] == "0"


def test_loader_config_differs_between_paths_only_in_use_unsloth() -> None:
    spec = {"checkpoint": "/c", "precision": "qlora", "seq_len": 2048, "checkpointing": "offload"}
    hf, unsloth = (planning.loader_config({**spec, "path": p}) for p in ("hf", "unsloth"))
    assert hf["model"].pop("use_unsloth") is False and unsloth["model"].pop("use_unsloth") is True
    assert hf == unsloth
    assert hf["model"]["load_in_4bit"] is True and hf["model"]["bnb_4bit_quant_type"] == "nf4"
    assert hf["lora"] == {
        "r": 16,
        "alpha": 16,
        "dropout": 0.0,
        "bias": "none",
        "target_modules": list(workload.LORA_TARGETS),
    }
    assert hf["model"]["gradient_checkpointing"] is True and hf["data"] == {"max_length": 2048}
    assert hf["model"]["offload_checkpoints"] is True  # Unsloth's own mode unless --checkpointing gpu
    plain = planning.loader_config({**spec, "path": "shim", "checkpointing": "gpu"})
    assert plain["model"]["offload_checkpoints"] is False


def test_checkpointing_option_reaches_the_specs_and_the_report() -> None:
    cases, settings = _plan("--qkv-bias-compare", "--checkpointing", "gpu")
    assert settings.checkpointing == "gpu"
    spec = runner.case_spec(cases[0], settings, Path("/c"))
    assert spec["checkpointing"] == "gpu"
    assert planning.loader_config(spec)["model"]["offload_checkpoints"] is False
    assert _plan()[1].checkpointing == "offload"
    row = {"shape": "qwen2.5-1.5b", "precision": "bf16", "checkpointing": "gpu"}
    assert "activations kept on the card" in report._checkpointing_text([row], settings)
    offload = {**row, "checkpointing": "offload"}
    assert "offloaded to host memory" in report._checkpointing_text([offload], Settings())
    assert "differs between the merged runs" in report._checkpointing_text([row, offload], settings)


def test_drop_qkv_bias_removes_every_q_k_v_bias_and_the_model_still_trains() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(workload.build_config(SHAPES["tiny-qwen2"]))
    assert worker.drop_qkv_bias(model) == 2 * 3
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.bias is None and attention.k_proj.bias is None and attention.v_proj.bias is None
    assert worker.drop_qkv_bias(model) == 0
    assert worker.qkv_forward(model) == {"none": 2}
    ids = torch.randint(0, 1024, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()


def test_error_line() -> None:
    assert worker.error_line(RuntimeError("CUDA out of memory.\nTried 2 GiB")) == (
        "RuntimeError: CUDA out of memory. ... Tried 2 GiB"
    )
    assert worker.error_line(AssertionError()) == "AssertionError"


def test_cpu_run_end_to_end_records_hf_and_a_failing_unsloth_worker(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The whole pipeline with real worker processes on CPU (tiny shape, about 25 s).

    Unsloth cannot train on CPU, so its worker fails: the run goes on, records the error's
    last line and exits 1. --out and --cache-dir are relative, as the defaults are: workers
    run in a directory of their own, so the paths they are handed must not be.
    """
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = [
        "--device", "cpu", "--shapes", "tiny-qwen3", "--paths", "hf,unsloth", "--precisions", "bf16",
        "--batch", "1", "--seq-len", "64", "--steps", "2", "--warmup", "1",
        "--out", "out", "--cache-dir", "cache",
    ]  # fmt: skip
    assert bench.main(argv) == 1
    captured = capsys.readouterr()
    assert "[1/2] tiny-qwen3 bf16 hf: batch 1 x 64: started" in captured.err
    assert "tokens/s" in captured.err and "FAILED (UnslothUnavailableError" in captured.err
    assert "1 of 2 cases failed: train-tiny-qwen3-bf16-unsloth" in captured.err
    assert captured.out.splitlines()[0].startswith("shape")
    report = json.loads((out / "bench.json").read_text())
    hf, unsloth = report["cases"]
    assert hf["status"] == "ok", hf
    assert hf["unsloth_imported"] is False and hf["unsloth_mode"] == "missing"
    assert len(hf["step_seconds"]) == 2 and hf["tokens_per_s"] > 0
    first, second = hf["step_ended_at"]
    assert 0 < second - first < 60 and abs(first - time.time()) < 600
    assert all(math.isfinite(loss) and loss > 0 for loss in hf["losses"])
    assert hf["trainable_params"] == bench.lora_params(SHAPES["tiny-qwen3"])
    # Every layer's attention of the 3 steps went through the watched SDPA call, in bf16.
    assert sum(hf["sdpa_inputs"].values()) >= 3 * SHAPES["tiny-qwen3"].num_hidden_layers, hf["sdpa_inputs"]
    assert all(kind.startswith("bfloat16 ") for kind in hf["sdpa_inputs"]), hf["sdpa_inputs"]
    assert unsloth["status"] == "failed"
    assert unsloth["error"].startswith("UnslothUnavailableError: model.use_unsloth is true but no CUDA GPU")
    assert report["commands"][0].startswith("python -m unsloth_qwen_compat bench --device cpu")
    assert (out / "bench.md").read_text().count("| tiny-qwen3 |") == 2
    assert (out / "logs" / "train-tiny-qwen3-bf16-hf.log").is_file()
    checkpoint = checkpoints.checkpoint_dir(SHAPES["tiny-qwen3"], tmp_path / "cache")
    assert checkpoints.checkpoint_ready(checkpoint) and (checkpoint / "tokenizer.json").is_file()
