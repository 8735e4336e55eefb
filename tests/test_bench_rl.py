"""``bench --rl``: its plan, the processes it shares, its step's arithmetic, its reports and
their place on BENCHMARKS.md, and the whole pipeline on CPU (hf path, a tiny shape).

No timing is asserted: the GPU numbers come from running the command on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from unsloth_qwen_compat import bench
from unsloth_qwen_compat.bench import Case, Settings, command, document, planning, report, rl, runner

from .test_bench import _fake_worker

# --------------------------------------------------------------------------------------
# The plan


def _plan(*args: str) -> tuple[list[Case], Settings]:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return bench.plan(parser.parse_args(["--rl", *args]))


def test_rl_plans_both_qwen3_shapes_both_precisions_three_paths_at_the_issue_size() -> None:
    cases, settings = _plan()
    assert [(c.mode, c.shape, c.precision, c.path) for c in cases] == [
        ("rl", shape, precision, path)
        for shape in ("qwen3-1.7b", "qwen3-8b")
        for precision in ("bf16", "qlora")
        for path in ("hf", "unsloth", "shim")
    ]
    assert {(c.batch, c.replies, c.seq_len) for c in cases} == {(8, 8, 256)}
    assert (settings.warmup, settings.steps, settings.process_per) == (2, 3, "case")
    assert cases[0].id == "rl-qwen3-1.7b-bf16-hf"
    assert cases[0].describe() == "qwen3-1.7b bf16 hf: 8 prompts x 8 replies x 256 new tokens"
    # The loaders get room for the prompt above the new tokens.
    spec = runner.case_spec(cases[0], settings, Path("/c"))
    assert planning.loader_config(spec)["data"]["max_length"] == 256 + planning.RL_PROMPT_ROOM
    # The training modes keep their own defaults.
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    _, train = bench.plan(parser.parse_args([]))
    assert (train.warmup, train.steps) == (2, 6)


def test_rl_sizes_and_steps_are_given_on_the_command_line() -> None:
    cases, settings = _plan(
        "--shapes", "qwen3-8b", "--precisions", "qlora", "--paths", "unsloth,shim",
        "--prompts", "4", "--replies", "2", "--new-tokens", "64", "--steps", "2", "--warmup", "0",
    )  # fmt: skip
    assert [(c.shape, c.precision, c.path, c.batch, c.replies, c.seq_len) for c in cases] == [
        ("qwen3-8b", "qlora", "unsloth", 4, 2, 64),
        ("qwen3-8b", "qlora", "shim", 4, 2, 64),
    ]
    assert (settings.steps, settings.warmup) == (2, 0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rl", "--batch", "4"], "not --batch / --seq-len"),
        (["--rl", "--seq-len", "512"], "not --batch / --seq-len"),
        (["--rl", "--replies", "0"], "--replies must be positive"),
        (["--prompts", "4"], "apply to --rl only"),
        (["--qkv-bias-compare", "--process-per", "shape"], "--process-per shape applies to"),
        (["--max-seq-bisect", "--process-per", "path"], "--process-per path applies to"),
    ],
)
def test_bad_rl_arguments_exit_2_with_the_problem(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert bench.main(["--dry-run", *args]) == 2
    assert message in capsys.readouterr().err


def test_process_per_shape_runs_a_paths_precisions_in_one_process_and_a_shape_on_one_card() -> None:
    cases, settings = _plan("--process-per", "shape")
    processes = runner.process_groups(cases, settings.process_per)
    assert [[c.id.removeprefix("rl-") for c in p] for p in processes] == [
        [f"{shape}-{precision}-{path}" for precision in ("bf16", "qlora")]
        for shape in ("qwen3-1.7b", "qwen3-8b")
        for path in ("hf", "unsloth", "shim")
    ]
    assert all(len({c.path for c in p}) == 1 for p in processes)  # paths never share a process
    cards = runner.card_groups(cases, settings.process_per)
    assert [{c.shape for c in g} for g in cards] == [{"qwen3-1.7b"}, {"qwen3-8b"}]
    assert [[case] for case in cases] == runner.process_groups(cases, "case")


def test_process_per_path_runs_all_of_a_paths_cases_in_one_process_on_one_card() -> None:
    cases, settings = _plan("--process-per", "path", "--paths", "unsloth,shim,hf")
    processes = runner.process_groups(cases, settings.process_per)
    assert [[c.id.removeprefix("rl-") for c in p] for p in processes] == [
        [
            f"{shape}-{precision}-{path}"
            for shape in ("qwen3-1.7b", "qwen3-8b")
            for precision in ("bf16", "qlora")
        ]
        for path in ("unsloth", "shim", "hf")
    ]
    assert runner.card_groups(cases, settings.process_per) == [cases]


def test_rl_rounds_alternate_stock_and_the_shim_with_hf_once_after_them() -> None:
    """On an H200, single processes of stock and of the shim (which runs no code inside a
    Qwen3 step) read 0.89x-1.11x apart: rounds put identical processes beside each other.
    Round 1 keeps the order given (hf first by default), hf runs once."""
    cases, settings = _plan(
        "--process-per", "path", "--rounds", "3", "--shapes", "qwen3-8b", "--precisions", "bf16,qlora"
    )
    processes = runner.process_groups(cases, settings.process_per)
    assert [(p[0].path, p[0].run, [c.precision for c in p]) for p in processes] == [
        ("hf", 1, ["bf16", "qlora"]),
        ("unsloth", 1, ["bf16", "qlora"]),
        ("shim", 1, ["bf16", "qlora"]),
        ("shim", 2, ["bf16", "qlora"]),
        ("unsloth", 2, ["bf16", "qlora"]),
        ("unsloth", 3, ["bf16", "qlora"]),
        ("shim", 3, ["bf16", "qlora"]),
    ]
    assert len({case.id for case in cases}) == len(cases) == 14
    given, _ = _plan(
        "--paths", "unsloth,shim,hf", "--rounds", "2", "--shapes", "qwen3-8b", "--precisions", "bf16"
    )
    assert [(c.path, c.run) for c in given] == [
        ("unsloth", 1),
        ("shim", 1),
        ("hf", 1),
        ("shim", 2),
        ("unsloth", 2),
    ]


def test_rl_rounds_take_each_paths_mean_and_say_how_far_identical_processes_differ() -> None:
    def run(path: str, step: float, number: int) -> dict:
        return {**_rl_result(path, step, 0.7 * step), "run": number}

    results = [run("unsloth", 5.0, 1), run("shim", 5.5, 1), run("shim", 5.0, 2), run("unsloth", 5.6, 2)]
    rows = report.summarize_rl([*results, _rl_result("hf", 20.0, 16.0)])
    shims = [row for row in rows if row["path"] == "shim"]
    assert [row["shim_vs_unsloth"] for row in shims] == [pytest.approx(5.3 / 5.25)] * 2
    assert shims[0]["process_spread"] == pytest.approx(1.12)  # stock's 5.6 over 5.0
    assert report.rl_rows(rows)[2][2] == "shim #2"
    text = report.render_markdown(
        "rl", rows, Settings(process_per="path", rounds=2), ["cmd"], "NVIDIA H200", {}
    )
    assert (
        "qwen3-8b qlora: shim/unsloth 1.01x over the runs' means, identical processes up to 1.12x apart"
        " (unsloth 2 runs, shim 2 runs finished)" in text
    )

    verdict = document.rl_shim_verdict
    assert verdict([{"shim_vs_unsloth": 1.0}]) == "met"
    assert verdict([{"shim_vs_unsloth": 0.95, "process_spread": 1.08}]).startswith("not resolved")
    assert verdict([{"shim_vs_unsloth": 0.89, "process_spread": 1.08}]) == "not met"
    assert verdict([{"shim_vs_unsloth": 0.89}]) == "not met"  # one run each: no spread to weigh
    # The spread measured on one row weighs every row of the run's step size.
    spread_elsewhere = [{"shim_vs_unsloth": 1.3, "process_spread": 1.29}, {"shim_vs_unsloth": 0.83}]
    assert verdict(spread_elsewhere) == (
        "not resolved: every shortfall is less than identical processes read apart (up to 1.29x)"
    )
    assert verdict([{"shim_vs_unsloth": 1.3, "process_spread": 1.29}, {"shim_vs_unsloth": 0.7}]) == "not met"


def test_dry_run_says_how_many_processes(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--dry-run", "--rl", "--process-per", "shape", "--prompts", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        "[1/12] qwen3-1.7b bf16 hf: 2 prompts x 8 replies x 256 new tokens, 2 warm-up + 3 timed steps"
        in lines
    )
    assert lines[-1].startswith("12 cases, in 6 processes (one per path and shape);")


# --------------------------------------------------------------------------------------
# One step's arithmetic


def test_group_advantages_are_normalised_within_each_prompts_replies() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    advantages = rl.group_advantages(rewards)
    assert advantages.shape == (6, 1)
    torch.testing.assert_close(advantages[:3, 0], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-3, rtol=0)
    assert torch.all(advantages[3:] == 0)  # equal rewards: no advantage


def test_completion_log_probs_are_log_softmax_of_the_previous_position() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=generator)
    sequences = torch.randint(0, 11, (2, 7), generator=generator)
    got = rl.completion_log_probs(logits, sequences, prompt_length=3)
    expected = (
        torch.log_softmax(logits[:, 2:6], dim=-1).gather(-1, sequences[:, 3:].unsqueeze(-1)).squeeze(-1)
    )
    torch.testing.assert_close(got, expected)


def test_grpo_loss_at_the_reference_is_the_policy_gradient_alone() -> None:
    # Policy == reference (LoRA starts at zero): KL 0 with a zero gradient, ratio 1, so the
    # loss is -sum(advantage * mask) / tokens and its gradient -advantage * mask / tokens.
    policy = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]], requires_grad=True)
    advantages = torch.tensor([[1.0], [-1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss = rl.grpo_token_loss(policy, policy.detach().clone(), advantages, mask, mask.sum())
    assert loss.item() == pytest.approx(-(2 - 3) / 5)
    loss.backward()
    torch.testing.assert_close(policy.grad, -advantages * mask / 5)
    # Away from the reference the KL term pulls back.
    moved = torch.tensor([[0.0, 0.0, 0.0]], requires_grad=True)
    kl_only = rl.grpo_token_loss(moved, torch.tensor([[-1.0, -1.0, -1.0]]), torch.zeros(1, 1), mask[:1], 2)
    assert kl_only.item() == pytest.approx(0.04 * (math.exp(-1) + 1 - 1))


def _step(step_s: float, generate: float, reference: float, tokens: int = 100, warmup: bool = False) -> dict:
    train = step_s - generate - reference
    return {
        "seconds": {"generate": generate, "reference": reference, "train": train},
        "peak_gib": {"generate": 3.0, "reference": 4.0, "train": 6.0},
        "step_s": step_s,
        "generated_tokens": tokens,
        "loss": 0.1,
        "warmup": warmup,
    }


def test_timed_steps_summary_medians_and_generated_tokens_per_second() -> None:
    summary = rl.summarize_rl_steps([_step(2.0, 1.5, 0.1), _step(3.0, 2.5, 0.1), _step(2.2, 1.6, 0.2)])
    assert summary["median_step_s"] == 2.2
    assert summary["slice_median_s"]["generate"] == 1.6
    assert summary["generated_tokens_per_s"] == pytest.approx(300 / 5.6)
    assert summary["peak_allocated_gib"] == 6.0 and summary["slice_peak_gib"]["reference"] == 4.0
    with pytest.raises(ValueError):
        rl.summarize_rl_steps([])


def test_a_row_whose_timed_steps_carry_a_compile_is_called_unsteady() -> None:
    """Measured on an H200: with one warm-up step, Unsloth's second step compiled again (13.8 s
    against 4.7 s): the page must not present that median without saying so."""
    steady = {**_rl_result("unsloth", 4.7, 4.0), "rl_steps": [_step(69.2, 4.5, 34.1, warmup=True),
              _step(2.0, 1.5, 0.1), _step(3.0, 2.5, 0.1), _step(2.2, 1.6, 0.2)]}  # fmt: skip
    unsteady = {**_rl_result("shim", 9.3, 4.2), "rl_steps": [_step(13.8, 4.4, 8.8), _step(4.7, 4.1, 0.2)]}
    rows = report.summarize_rl([steady, unsteady])
    assert rows[0]["step_spread"] == pytest.approx(1.5)  # the warm-up step is not counted
    assert [r["path"] for r in report.unsteady_rl_rows(rows)] == ["shim"]
    text = report.render_markdown("rl", rows, Settings(process_per="path"), ["cmd"], "NVIDIA H200", {})
    assert "Unsteady rows" in text and "qwen3-8b qlora shim (2.9x)" in text
    assert "qwen3-8b qlora unsloth (" not in text


# --------------------------------------------------------------------------------------
# Reports


def _rl_result(
    path: str, step_s: float, generate: float, shape: str = "qwen3-8b", precision: str = "qlora"
) -> dict:
    case = Case("rl", shape, precision, path, 8, 256, replies=8)
    return {
        **asdict(case),
        "id": case.id,
        "warmup": 1,
        "steps": 3,
        "checkpointing": "offload",
        "process_per": "shape",
        "status": "ok",
        "device_name": "NVIDIA H200",
        "median_step_s": step_s,
        "slice_median_s": {"generate": generate, "reference": 0.1 * step_s, "train": 0.9 * step_s - generate},
        "slice_peak_gib": {"generate": 5.0, "reference": 6.0, "train": 9.0},
        "generated_tokens_per_s": 16384 / generate,
        "peak_allocated_gib": 9.0 if path != "hf" else 18.0,
    }


def test_rl_report_ratios_largest_slice_and_where_the_time_goes() -> None:
    results = [_rl_result("hf", 20.0, 16.0), _rl_result("unsloth", 5.0, 3.5), _rl_result("shim", 4.0, 2.6)]
    broken_case = Case("rl", "qwen3-1.7b", "bf16", "hf", 8, 256, replies=8)
    failed = {**asdict(broken_case), "id": broken_case.id, "status": "failed", "error": "boom"}
    rows = report.summarize_rl([*results, failed])
    hf, stock, shim, broken = rows
    assert stock["speed_vs_hf"] == pytest.approx(4.0) and shim["shim_vs_unsloth"] == pytest.approx(1.25)
    assert stock["memory_vs_hf"] == pytest.approx(0.5) and "shim_vs_unsloth" not in stock
    assert hf["largest_slice"] == "generate" and hf["slice_share"]["generate"] == pytest.approx(0.8)
    assert [r["path"] for r in report.rl_fastest(rows)] == ["shim"]
    cells = report.rl_rows(rows)
    assert cells[2] == [
        "qwen3-8b", "qlora", "shim", "8 x 8 x 256", "4.00", "2.60", "0.40", "1.00", "6,302", "9.0",
        "generate (65%)", "5.00x", "0.50x", "1.25x",
    ]  # fmt: skip
    assert cells[3][4] == "failed (below)" and len(cells[3]) == len(report.RL_HEADER)
    text = report.render_markdown("rl", rows, Settings(process_per="shape"), ["cmd"], "NVIDIA H200", {})
    assert (
        "one step: 8 prompts x 8 replies x 256 new tokens; 1 warm-up step, then the median of 3 timed steps"
        in text
    )
    assert "one process per path and shape" in text and "random token ids" not in text
    assert (
        "- qwen3-8b qlora, shim: step 4.00 s = generate 2.60 s (65%), reference 0.40 s (10%), train 1.00 s (25%)"
        in text
    )
    assert "failed: rl-qwen3-1.7b-bf16-hf: boom" in text


def test_the_rl_run_reports_what_its_workers_returned(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def worker(spec: dict, work: Path, log: Path, timeout: float, gpu: str | None = None) -> dict:
        if spec["mode"] == "prepare":
            return _fake_worker(spec, work, log, timeout, gpu)
        step = {"hf": 20.0, "unsloth": 5.0, "shim": 4.9}[spec["path"]]
        return _rl_result(spec["path"], step, 0.7 * step, spec["shape"], spec["precision"])

    monkeypatch.setattr(command, "_gpu_name", lambda: "NVIDIA H200")
    monkeypatch.setattr(runner, "run_worker", worker)
    out = tmp_path / "out"
    assert (
        bench.main(["--rl", "--shapes", "qwen3-1.7b", "--out", str(out), "--cache-dir", str(tmp_path / "c")])
        == 0
    )
    data = json.loads((out / "rl.json").read_text())
    assert data["kind"] == "rl" and data["rl_step"]["beta"] == 0.04 and len(data["cases"]) == 6
    assert "| qwen3-1.7b | qlora | shim | 8 x 8 x 256 | 4.90 |" in (out / "rl.md").read_text()
    assert capsys.readouterr().out.splitlines()[0].startswith("shape")


def test_rl_rows_on_the_page_and_in_the_summary(tmp_path: Path) -> None:
    benchmarks = tmp_path / "benchmarks"
    (benchmarks / "rl").mkdir(parents=True)
    results = [_rl_result("hf", 20.0, 16.0), _rl_result("unsloth", 5.0, 3.5), _rl_result("shim", 4.0, 2.6)]
    data = {
        "kind": "rl",
        "commands": ["python -m unsloth_qwen_compat bench --rl"],
        "card": "NVIDIA H200",
        "versions": {"torch": "2.11.0", "transformers": "5.17.0", "unsloth": "2026.10.9"},
        "settings": asdict(Settings(warmup=1, steps=3, process_per="shape")),
        "cases": results,
    }
    (benchmarks / "rl" / "rl.json").write_text(json.dumps(data))
    runs = [{"dir": "rl", "title": "an RL run", "notes": [], "superseded": []}]
    (benchmarks / "runs.json").write_text(json.dumps({"runs": runs}))
    page = document.render_page(benchmarks)
    assert "### RL steps (GRPO-style): generate, reference log-probs, train ([`rl.json`]" in page
    assert "| qwen3-8b | qlora | unsloth | 8 x 8 x 256 | 5.00 |" in page
    (line,) = [
        line for line in document.summary(document.load_runs(benchmarks)) if line.startswith("- RL step")
    ]
    assert line.startswith(
        "- RL step (8 prompts x 8 replies x 256 new tokens): stock Unsloth steps at 4.00x in qlora HF + PEFT's "
        "speed (qwen3-8b); the shim at 1.25x stock Unsloth's step speed (qwen3-8b qlora 1.25x; target >= 0.99: "
        "met); on every row's fastest path the largest slice is generate (65% of the step; qwen3-8b qlora shim: "
    )


# --------------------------------------------------------------------------------------
# Several cases in one worker process


def test_one_process_reports_each_case_as_it_is_done_and_names_what_it_never_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in worker: writes the first spec's result, then dies before the second.
    script = (
        "import json, sys, time\n"
        "first = json.load(open(sys.argv[1]))\n"
        "open(first['result'], 'w').write(json.dumps({'status': 'ok', 'n': 1}))\n"
        "time.sleep(3)\n"
        "print('Killed: out of host memory', flush=True); sys.exit(137)\n"
    )
    monkeypatch.setattr(
        runner, "worker_command", lambda *paths: [sys.executable, "-c", script, *map(str, paths)]
    )
    monkeypatch.setattr(runner, "POLL_SECONDS", 0.2)
    seen: list[tuple[int, str]] = []
    specs = [{"id": "a", "path": "hf", "device": "cpu"}, {"id": "b", "path": "hf", "device": "cpu"}]
    results = runner.run_workers(
        specs,
        tmp_path / "work",
        tmp_path / "log.txt",
        timeout=60,
        on_result=lambda i, r: seen.append((i, r["status"])),
    )
    assert seen == [(0, "ok"), (1, "failed")]  # the first while the process still ran
    assert results[0] == {"status": "ok", "n": 1}
    assert results[1] == {
        "status": "failed",
        "error": "worker exited 137 without a result: Killed: out of host memory",
    }


# --------------------------------------------------------------------------------------
# End to end on CPU


def test_cpu_rl_run_end_to_end_two_cases_in_one_hf_process(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Real worker processes on CPU (tiny shape, about 30 s): hf trains its RL steps; qlora
    needs CUDA, so that case fails, recorded, and the process goes on to the next."""
    monkeypatch.chdir(tmp_path)
    argv = [
        "--rl", "--device", "cpu", "--shapes", "tiny-qwen3", "--paths", "hf", "--precisions", "qlora,bf16",
        "--prompts", "2", "--replies", "2", "--new-tokens", "4", "--steps", "1", "--warmup", "1",
        "--process-per", "shape", "--out", "out", "--cache-dir", "cache",
    ]  # fmt: skip
    assert bench.main(argv) == 1
    err = capsys.readouterr().err
    assert "one worker process runs, in turn: rl-tiny-qwen3-qlora-hf, rl-tiny-qwen3-bf16-hf" in err
    data = json.loads((tmp_path / "out" / "rl.json").read_text())
    qlora, bf16 = data["cases"]
    assert qlora["status"] == "failed" and "no CUDA GPU" in qlora["error"]
    assert bf16["status"] == "ok", bf16
    assert bf16["process_cases"] == ["rl-tiny-qwen3-qlora-hf", "rl-tiny-qwen3-bf16-hf"]
    assert bf16["unsloth_imported"] is False
    warmup, timed = bf16["rl_steps"]
    assert (warmup["warmup"], timed["warmup"]) == (True, False)
    # Every reply ran to its full length: 2 prompts x 2 replies x 4 tokens.
    assert timed["sequences"] == 4 and timed["generated_tokens"] == 16
    assert timed["sequence_length"] == timed["prompt_length"] + 4
    assert set(timed["seconds"]) == {"generate", "reference", "train"} and math.isfinite(timed["loss"])
    assert bf16["trainable_params"] == bench.lora_params(bench.SHAPES["tiny-qwen3"])
    assert "| tiny-qwen3 | bf16 | hf | 2 x 2 x 4 |" in (tmp_path / "out" / "rl.md").read_text()


#: What a worker returns for an rl row, as far as the runner's progress line reads it.
_RL_OK = {
    "status": "ok",
    "slice_median_s": {"generate": 1.0},
    "median_step_s": 1.0,
    "generated_tokens_per_s": 1.0,
}


def _two_shapes_in_one_process(monkeypatch, built: dict) -> tuple[list[Case], Settings, list[dict]]:
    """Stock's path at both Qwen3 shapes in one process, the checkpoints ``built`` (shape ->
    (directory, error)), and a stand-in for the worker process that records the specs it got."""
    cases, settings = _plan(
        "--process-per", "path", "--paths", "unsloth", "--precisions", "bf16", "--shapes", "qwen3-1.7b,qwen3-8b"
    )  # fmt: skip
    monkeypatch.setattr(runner, "prepare_checkpoints", lambda *a, **k: built)
    seen: list[dict] = []

    def fake_workers(specs, work, log, timeout, gpu=None, on_result=None):
        seen.extend(specs)
        for index in range(len(specs)):
            if on_result is not None:
                on_result(index, dict(_RL_OK))
        return [dict(_RL_OK) for _ in specs]

    monkeypatch.setattr(runner, "run_workers", fake_workers)
    return cases, settings, seen


def test_a_process_of_several_shapes_loads_each_cases_own_checkpoint(tmp_path, monkeypatch) -> None:
    """--process-per path runs both shapes in one process: each spec names its own shape's
    checkpoint (on an H200 every row after the first loaded the first row's model)."""
    built = {name: (tmp_path / name, None) for name in ("qwen3-1.7b", "qwen3-8b")}
    cases, settings, seen = _two_shapes_in_one_process(monkeypatch, built)
    runner.run_cases(cases, settings, tmp_path / "out", tmp_path / "cache")
    assert [(spec["shape"], Path(spec["checkpoint"]).name) for spec in seen] == [
        ("qwen3-1.7b", "qwen3-1.7b"),
        ("qwen3-8b", "qwen3-8b"),
    ]


def test_a_process_of_several_shapes_fails_only_the_rows_whose_checkpoint_was_not_built(
    tmp_path, monkeypatch
) -> None:
    built = {
        "qwen3-1.7b": (tmp_path / "a", None),
        "qwen3-8b": (tmp_path / "b", "checkpoint not built: disk full"),
    }
    cases, settings, seen = _two_shapes_in_one_process(monkeypatch, built)
    results = runner.run_cases(cases, settings, tmp_path / "out", tmp_path / "cache")
    assert [(r["shape"], r["status"]) for r in results] == [("qwen3-1.7b", "ok"), ("qwen3-8b", "failed")]
    assert results[1]["error"] == "checkpoint not built: disk full"
    assert [spec["shape"] for spec in seen] == ["qwen3-1.7b"]


def test_the_worker_refuses_a_model_that_is_not_the_rows_shape() -> None:
    from unsloth_qwen_compat.bench.worker import check_loaded_shape
    from unsloth_qwen_compat.bench.workload import SHAPES

    eight = SHAPES["qwen3-8b"]
    config = argparse.Namespace(hidden_size=4096, num_hidden_layers=36, intermediate_size=12288)
    check_loaded_shape(config, eight)
    with pytest.raises(RuntimeError, match="qwen3-1.7b .* would time another model"):
        check_loaded_shape(config, SHAPES["qwen3-1.7b"])


def test_rl_summary_lists_each_reports_ratio_and_weighs_them_against_the_measured_spread() -> None:
    def rows_of(report_name: str, *results: dict) -> list[dict]:
        return [{**row, "report": report_name} for row in report.summarize_rl(list(results))]

    def run(path: str, step: float, number: int = 1) -> dict:
        return {**_rl_result(path, step, 0.7 * step), "run": number}

    rounds = rows_of("a.json", run("unsloth", 5.0), run("shim", 4.0), run("shim", 5.2, 2))
    single = rows_of("b.json", run("unsloth", 4.0), run("shim", 4.6))
    (line,) = document.rl_summary(rounds + single)
    assert "qwen3-8b qlora 1.09x (identical processes up to 1.30x apart), 0.87x;" in line
    assert "not resolved: every shortfall is less than identical processes read apart (up to 1.30x)" in line
    (alone,) = document.rl_summary(single)
    assert "qwen3-8b qlora 0.87x; target >= 0.99: not met" in alone
