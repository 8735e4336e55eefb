"""``python -m unsloth_qwen_compat._legs_table [REPORTS_DIR] [--readme README.md]``: the README's
supported-versions table.

One row per leg of :data:`._matrix.LEGS` (its pins) and, in the last column, what the
leg's latest raw conformance reports say: ``REPORTS_DIR/<leg>/{shim,stock}.json``
(default ``conformance-reports``), read as JSON, give the cases they selected, their
counts per result, the GPU, dtype and date. With ``--readme`` the table replaces the
block between the ``legs`` markers of that file; tests/test_matrix.py checks that the
README's block is what this gives.

The reports exist only in a checkout of the repository (a wheel does not carry them), so
only this tool and its test read them: ``status`` and ``doctor`` never do.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# The README and CONFORMANCE.md (conformance/document.py) say a run's selection and counts
# with the same words; that module imports neither Unsloth nor this package.
from conformance.raw_reports import counts, dates, selection, unended, unfinished

from ._matrix import LEGS

#: The README block this module writes, between these markers.
README_START, README_END = "<!-- legs:", "<!-- /legs -->"
#: Where a checkout keeps the raw conformance reports, relative to its root.
REPORTS_DIR = "conformance-reports"
#: The runs a leg's row is made of (``mutation-*.json`` files beside them are not).
RUNS = ("shim", "stock")


def read_reports(reports: Path, leg: str) -> dict[str, dict[str, Any]]:
    """``{"shim": report, "stock": report}`` of ``reports/<leg>/``, the runs it has."""
    return {
        run: json.loads(path.read_text(encoding="utf-8"))
        for run in RUNS
        if (path := reports / leg / f"{run}.json").is_file()
    }


def circumstances(report: dict[str, Any]) -> str:
    return f"{report['versions'].get('gpu', 'no GPU')}, {report['dtype']}, {dates(report)}"


def conformance_cell(runs: dict[str, dict[str, Any]]) -> str:
    """E.g. "`-m rope`: shim 87 pass, 4 refused, 0 fail vs stock 65 pass, 26 fail (NVIDIA H200,
    fp32, 2026-12-02)"; what differs between the runs is said per run."""
    if not runs:
        return "no raw report committed"
    same_cases = len({selection(r) for r in runs.values()}) == 1
    same_circumstances = len({circumstances(r) for r in runs.values()}) == 1
    parts = []
    for run, report in runs.items():
        part = run
        if not same_cases:
            part += f" ({selection(report)})"
        part += f" {counts(report)}"
        if unfinished(report) and not unended(report):  # an older report: it cannot name them
            part += f"; {unfinished(report)}"
        if not same_circumstances:
            part += f" ({circumstances(report)})"
        parts.append(part)
    text, first = " vs ".join(parts), next(iter(runs.values()))
    if same_cases:
        text = f"{selection(first)}: {text}"
    if same_circumstances:
        text += f" ({circumstances(first)})"
    return text


def markdown_table(reports: Path) -> str:
    """The README's supported-versions table: :data:`LEGS`, and each leg's latest raw reports."""
    rows = [
        "| leg (`tox -e gpu-<leg>`) | unsloth | unsloth_zoo | transformers | trl | peft "
        f"| latest raw reports, `{REPORTS_DIR}/<leg>/` |",
        "|---|---|---|---|---|---|---|",
    ]
    for leg in LEGS:
        runs = read_reports(reports, leg.name)
        cell = (
            conformance_cell(runs)
            if runs or leg.measured
            else "no committed run (partial runs: conformance-reports/evidence/)"
        )
        rows.append(
            f"| {leg.name} | {leg.unsloth} | {leg.unsloth_zoo} | {leg.transformers} | {leg.trl} "
            f"| {leg.peft} | {cell} |"
        )
    return "\n".join(rows)


def block_span(readme: str) -> tuple[int, int]:
    """Where the generated part of a README's text is (between the marker lines)."""
    start = readme.index("\n", readme.index(README_START)) + 1
    return start, readme.index(README_END, start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unsloth_qwen_compat._legs_table",
        description="Print the README's supported-versions table (run from a checkout).",
    )
    parser.add_argument("reports", nargs="?", default=REPORTS_DIR, help=f"default: ./{REPORTS_DIR}")
    parser.add_argument("--readme", type=Path, help="rewrite the legs block of this file")
    args = parser.parse_args(argv)
    reports = Path(args.reports)
    if not reports.is_dir():
        print(f"no {reports}/ here: run this from a checkout of the repository", file=sys.stderr)
        return 1
    table = markdown_table(reports)
    if args.readme:
        text = args.readme.read_text(encoding="utf-8")
        start, end = block_span(text)
        args.readme.write_text(text[:start] + table + "\n" + text[end:], encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
