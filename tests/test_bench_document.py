"""BENCHMARKS.md and the README's benchmark lines are generated from benchmarks/: the
committed pages are what the committed results give, and the page says what the bench says."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from unsloth_qwen_compat.bench import document, report
from unsloth_qwen_compat.bench.planning import Settings

from .conftest import REPO
from .test_bench import _result

BENCHMARKS = REPO / "benchmarks"


def test_the_committed_page_is_what_the_committed_results_give() -> None:
    assert (REPO / "BENCHMARKS.md").read_text() == document.render_page(BENCHMARKS), (
        f"BENCHMARKS.md is stale: run {document.COMMAND}"
    )


def test_the_readme_numbers_are_what_the_committed_results_give() -> None:
    readme = (REPO / "README.md").read_text()
    assert document.update_readme(readme, document.readme_block(BENCHMARKS)) == readme, (
        f"README.md's benchmark lines are stale: run {document.COMMAND}"
    )


def test_the_page_prints_the_benches_own_verdicts() -> None:
    page = (REPO / "BENCHMARKS.md").read_text()
    verdicts = {}
    for run in document.load_runs(BENCHMARKS):
        for shown in run.reports:
            if shown.kind == "qkv":
                on_page = {(row["shape"], row["precision"]) for row in shown.rows}
                for row in report.summarize_qkv(shown.data["cases"], shown.data["settings"]["rounds"]):
                    if (row["shape"], row["precision"]) in on_page:
                        verdicts[shown.path.name, row["precision"]] = row["verdict"]
                        assert f"| {row['verdict']} |" in page
    # The batch-12 comparisons lost their closing stock run to a time limit: not resolved,
    # whatever the runs that are there give; the Qwen2.5-7B ones are complete.
    for name in ("qkv_bias-qwen2.5-1.5b-bf16-batch12.json", "qkv_bias-qwen2.5-1.5b-qlora-batch12.json"):
        (verdict,) = [v for (file, _), v in verdicts.items() if file == name]
        assert verdict.startswith("not resolved: stock #2 did not run") and "met" not in verdict
    assert verdicts["qkv_bias-qwen2.5-7b-bf16.json", "bf16"] == "0.88 (met)"
    assert verdicts["qkv_bias-qwen2.5-7b-qlora.json", "qlora"] == "0.98 (met)"
    summary = page.split("## Where things stand", 1)[1].split("\n## ", 1)[0]
    assert all(verdict in summary for verdict in verdicts.values())


# --------------------------------------------------------------------------------------
# A made-up benchmarks/ directory


def _train(path: str, seconds: float) -> dict:
    return _result(path, 4 * 2048 / seconds, 9.0, warmup=2, steps=6)


def _write_report(directory: Path, name: str, cases: list[dict]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    data = {
        "kind": "train",
        "commands": [f"python -m unsloth_qwen_compat bench  # {name}"],
        "card": "NVIDIA H200",
        "versions": {"torch": "2.11.0", "transformers": "5.17.0", "unsloth": "2026.10.9"},
        "settings": asdict(Settings()),
        "cases": cases,
    }
    (directory / name).write_text(json.dumps(data))


@pytest.fixture
def made_up(tmp_path: Path) -> Path:
    """Two runs: the newer measures the shim again; the older has a superseded report."""
    benchmarks = tmp_path / "benchmarks"
    _write_report(benchmarks / "new", "bench.json", [_train("unsloth", 0.50), _train("shim", 0.40)])
    _write_report(
        benchmarks / "old", "bench.json", [_train("hf", 1.0), _train("unsloth", 0.5), _train("shim", 0.55)]
    )
    _write_report(benchmarks / "old", "noisy.json", [_train("hf", 2.0)])
    runs = [
        {"dir": "new", "title": "the newer run", "notes": ["a note"], "superseded": []},
        {
            "dir": "old",
            "title": "the older run",
            "notes": [],
            "superseded": [{"files": ["noisy.json"], "why": "too noisy"}],
        },
    ]
    (benchmarks / "runs.json").write_text(json.dumps({"runs": runs}))
    (tmp_path / "README.md").write_text(
        f"# x\n\n{document.README_BEGIN}\nold\n{document.README_END}\n\nrest\n"
    )
    return tmp_path


def test_a_later_measurement_and_a_superseded_report_leave_the_page(made_up: Path) -> None:
    page = document.render_page(made_up / "benchmarks")
    new, old = page.split("## the newer run")[1].split("## the older run")
    assert "- a note" in new and "| qwen3-1.7b | bf16 | shim | 4 x 2048 | 0.400 |" in new
    # The older run keeps what nobody measured again, with its ratios from its own run.
    assert "| qwen3-1.7b | bf16 | hf | 4 x 2048 | 1.000 |" in old
    assert "| qwen3-1.7b | bf16 | unsloth | 4 x 2048 | 0.500 |" not in old
    assert "0.550" not in old and "2.000" not in page
    assert (
        "- Not shown, measured again by a later run: `bench.json` (qwen3-1.7b bf16 unsloth, qwen3-1.7b bf16 shim)."
        in old
    )
    assert "- Not shown, superseded: `noisy.json`: too noisy." in old
    assert "- Raw results: [`benchmarks/old/`](benchmarks/old/)." in old
    # The summary reads the shown rows only: the shim against the newer run's stock.
    assert (
        "the shim trains at 1.25x stock Unsloth's tokens/s (qwen3-1.7b 1.25x bf16; target >= 0.99: met)"
        in page
    )


def test_the_command_writes_both_pages_and_check_says_when_they_are_stale(
    made_up: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert document.main(["--root", str(made_up), "--check"]) == 1
    assert "BENCHMARKS.md: not what" in capsys.readouterr().err
    assert document.main(["--root", str(made_up)]) == 0
    readme = (made_up / "README.md").read_text()
    assert readme.startswith("# x\n\n") and readme.endswith(f"{document.README_END}\n\nrest\n")
    assert "- Training at batch 4 x 2048:" in readme and "\nold\n" not in readme
    assert (made_up / "BENCHMARKS.md").read_text() == document.render_page(made_up / "benchmarks")
    assert document.main(["--root", str(made_up), "--check"]) == 0


def test_a_superseded_file_that_is_not_there_is_an_error(made_up: Path) -> None:
    (made_up / "benchmarks" / "old" / "noisy.json").unlink()
    with pytest.raises(FileNotFoundError, match="old has no noisy.json"):
        document.load_runs(made_up / "benchmarks")


def test_the_committed_results_are_all_listed(tmp_path: Path) -> None:
    # Every run directory is in runs.json, so no result is silently off the page.
    listed = {run["dir"] for run in json.loads((BENCHMARKS / "runs.json").read_text())["runs"]}
    assert listed == {path.name for path in BENCHMARKS.iterdir() if path.is_dir()}
    shutil.copytree(BENCHMARKS, tmp_path / "benchmarks")
    assert document.render_page(tmp_path / "benchmarks") == document.render_page(BENCHMARKS)
