"""The README's supported-models table is what conformance.model_table makes of the committed reports."""

from __future__ import annotations

import json

from conformance import model_table

from .conftest import REPO


def test_readme_models_table_is_generated_from_the_committed_reports() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start, end = model_table.block_span(readme)
    lines = model_table.table(
        model_table.read(REPO / "conformance-reports"), model_table.legs_of_the_matrix()
    )
    assert readme[start:end] == "\n".join(lines) + "\n", (
        "run: python -m conformance.model_table --readme README.md"
    )


def test_every_leg_of_the_matrix_is_a_column() -> None:
    assert model_table.legs_of_the_matrix()[:3] == ["2026.10", "2025.10", "2025.3"]
    assert "latest" in model_table.legs_of_the_matrix()


def _run(
    tmp_path, leg: str, name: str, date: str, cases: dict[str, str], dtype: str = "fp32", not_started=()
) -> None:
    (tmp_path / leg).mkdir(exist_ok=True)
    report = {
        "date": date,
        "dtype": dtype,
        "cases": [{"case": c, "result": r, "metrics": []} for c, r in cases.items()],
        "not_started": [f"conformance/test_x.py::{c}" for c in not_started],
    }
    (tmp_path / leg / f"{name}.json").write_text(json.dumps(report), encoding="utf-8")


def test_cells_say_right_patched_refused_and_wrong(tmp_path) -> None:
    _run(
        tmp_path,
        "a",
        "shim",
        "2026-12-01",
        {
            "test_forward_logits[qwen3-plain-FastLanguageModel]": "pass",
            "test_forward_logits[qwen3-plain-FastModel]": "pass",
            "test_forward_logits[qwen3_5-plain-FastModel]": "pass",
            "test_lora_gradients[qwen3_5-plain-FastModel]": "pass",
            "test_forward_logits[qwen3_next-plain-FastLanguageModel]": "refused",
            "test_forward_logits[qwen3_moe-plain-FastModel]": "fail",
            "test_rope_grid[llama-default-inside-96]": "pass",  # a control: no row
        },
    )
    _run(
        tmp_path,
        "a",
        "stock",
        "2026-12-01",
        {
            "test_forward_logits[qwen3-plain-FastLanguageModel]": "pass",
            "test_forward_logits[qwen3-plain-FastModel]": "pass",
            "test_forward_logits[qwen3_5-plain-FastModel]": "pass",
            "test_lora_gradients[qwen3_5-plain-FastModel]": "fail",
        },
    )
    # A newer run of the same case (here in another dtype) wins over the older one.
    _run(
        tmp_path,
        "a",
        "shim.bf16",
        "2026-12-02",
        {"test_lora_gradients[qwen3_5-plain-FastModel]": "pass"},
        "bf16",
    )
    rows = {line.split(" | ")[0].strip("| "): line for line in model_table.table(model_table.read(tmp_path))}
    assert "right: 2 pass, stock too" in rows["Qwen3"]
    assert "patched: 2 pass with the shim, stock fails 1" in rows["Qwen3.5"]
    assert "refused (1 cases, via FastLanguageModel)" in rows["Qwen3-Next"]
    assert "**WRONG**: 1 of 1 cases fail with the shim (via FastModel)" in rows["Qwen3-MoE"]
    assert rows["Qwen2 / Qwen2.5"].endswith("| - |")


def test_cases_a_stopped_run_did_not_end_are_counted_as_such(tmp_path) -> None:
    """A leg stopped at its time limit (on an H200, 44 hybrid cases of 470 did not end): the
    case it was inside and those it never started are neither passes nor skips."""
    _run(
        tmp_path,
        "a",
        "shim",
        "2026-12-03",
        {
            "test_forward_logits[qwen3_5-plain-FastModel]": "pass",
            "test_chat_template[qwen3_5-plain-get_chat_template-FastModel]": "skip",
            "test_lora_gradients[qwen3_5-plain-FastModel]": None,
        },
        not_started=[
            "test_nf4_logits[qwen3_5-plain-FastModel]",
            "test_forward_logits[qwen3_5-plain-FastModel]",
        ],
    )
    _run(tmp_path, "a", "stock", "2026-12-03", {"test_forward_logits[qwen3_5-plain-FastModel]": "fail"})
    rows = {line.split(" | ")[0].strip("| "): line for line in model_table.table(model_table.read(tmp_path))}
    # The not-started forward case has a result in the same run: the result stands.
    assert (
        "patched: 1 pass with the shim, stock fails 1; 1 skipped; 2 not ended (the run stopped first)"
        in (rows["Qwen3.5"])
    )


def test_a_stock_run_from_before_ids_named_the_entry_point_still_compares(tmp_path) -> None:
    """Older reports ran FastLanguageModel only and their ids do not name it (and grid ids carry
    an xdist group): their failures must count against the same cases of a newer shim run."""
    _run(
        tmp_path,
        "a",
        "shim",
        "2026-12-02",
        {
            "test_rope_grid[qwen3-linear-past_coverage-109-FastLanguageModel]@FastLanguageModel_rope_grid-qwen3-linear": "pass",
            "test_rope_grid[qwen3-linear-past_coverage-109-FastModel]@FastModel_rope_grid-qwen3-linear": "pass",
        },
    )
    _run(
        tmp_path,
        "a",
        "stock",
        "2026-12-01",
        {"test_rope_grid[qwen3-linear-past_coverage-109]@rope_grid-qwen3": "fail"},
    )
    rows = {line.split(" | ")[0].strip("| "): line for line in model_table.table(model_table.read(tmp_path))}
    assert "patched: 2 pass with the shim, stock fails 1" in rows["Qwen3"]
