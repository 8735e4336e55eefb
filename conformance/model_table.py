"""``python -m conformance.model_table [REPORTS_DIR] [--readme README.md]``: supported models x legs.

Reads the committed raw reports ``REPORTS_DIR/<leg>/{shim,stock}[.<dtype>].json`` (default
``conformance-reports``; raw_reports.py; mutation runs are not the leg's), takes every case of a Qwen model family (a zoo model ``[<family>-plain...]`` or a RoPE
grid cell ``[<family>-<type>...]``) and says per family and leg what the shim runs ended in:

- **right**: stock Unsloth passed every case the shim passed (the shim is not needed there);
- **patched**: the shim passed what stock failed;
- **refused**: the shim refused the family on that leg (declared in conformance/refusals.py);
- **WRONG**: a case failed or errored with the shim;
- ``-``: no committed run has a case of the family.

Cases a stopped run did not end (running when it stopped, or never started) are counted as
such, never as passed or skipped.

A case id that appears in several runs of a leg counts once, from the newest run. With
``--readme`` the table replaces the block between the ``models`` markers of that file;
tests/test_model_table.py checks that the README's block is what this gives.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

from conformance import raw_reports, zoo

START, END = "<!-- models:", "<!-- /models -->"
REPORTS_DIR = raw_reports.REPORTS_DIR
#: The families' names as the README says them.
LABELS = {
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "qwen3_moe": "Qwen3-MoE",
    "qwen3_5": "Qwen3.5",
    "qwen3_5_moe": "Qwen3.5-MoE",
    "qwen3_next": "Qwen3-Next",
}
#: The id's first parameter is the model family; the entry point, where recorded, ends it.
CASE = re.compile(
    r"test_\w+\[(?P<family>" + "|".join(sorted(zoo.FAMILIES, key=len, reverse=True)) + r")-[^\]]*?"
    r"(-(?P<entry>Fast[A-Za-z]+))?\](@\S+)?"
)
FAILED = ("fail", "error")


def read(reports: Path, runs_of_a_gpu_run: bool = False) -> dict[str, dict[str, dict[str, dict]]]:
    """{leg: {"shim" | "stock": {case id: case}}}, each case id from the newest run holding it
    (runs of either kind in any dtype; mutation runs are not the leg's). ``runs_of_a_gpu_run``:
    ``reports`` is what conformance/offline_legs.sh wrote (``<leg>/<run>/conformance.json``)."""
    legs: dict = {}
    for leg, runs in (_gpu_run(reports) if runs_of_a_gpu_run else raw_reports.read(reports)).items():
        for run in runs:
            if run.kind == "mutation":
                continue
            cases = legs.setdefault(leg, {}).setdefault(run.kind, {})
            for case in run.cases:
                key = raw_reports.case_name(case)
                if key not in cases or run.data["date"] >= cases[key]["_date"]:
                    cases[key] = {**case, "_date": run.data["date"]}
            # A stopped run's cases that never started: no result, unless another run has one.
            for nodeid in run.data.get("not_started", []):
                key = nodeid.split("::")[-1]
                cases.setdefault(
                    key, {"case": key, "nodeid": nodeid, "result": None, "_date": run.data["date"]}
                )
    return legs


def _gpu_run(root: Path) -> dict[str, list[raw_reports.Run]]:
    found: dict[str, list[raw_reports.Run]] = {}
    for path in sorted(root.glob("*/*/conformance.json")):
        leg = path.parent.parent.name
        found.setdefault(leg, []).append(raw_reports.parse(path, leg, stem=path.parent.name))
    return found


def not_passed(legs: dict) -> list[str]:
    """One line per case of a Qwen family that failed, errored or was refused, per leg and run,
    with its reason (skips are the suite's own, saying why, and are left out)."""
    lines = []
    for leg in sorted(legs, key=raw_reports.leg_key):
        for mode, cases in sorted(legs[leg].items()):
            for key, case in sorted(cases.items()):
                if CASE.fullmatch(key) and case["result"] not in ("pass", "skip"):
                    reason = " ".join(str(case.get("reason", "")).split())[:200]
                    lines.append(f"{leg} {mode} {case['result']}: {key} {reason}")
    return lines


def _by_family(cases: dict[str, dict]) -> dict[str, list[tuple[str, str, str]]]:
    """family -> [(case id, entry point, result)]. The id is canonical: no xdist group, and the
    entry point always named, so that a run from before ids named it (FastLanguageModel only)
    and a newer one compare case by case."""
    out = defaultdict(list)
    for key, case in cases.items():
        match = CASE.fullmatch(key)
        if match:
            entry = match["entry"] or "FastLanguageModel"
            case_id = key.split("@")[0]
            if not match["entry"]:
                case_id = f"{case_id[:-1]}-{entry}]"
            out[match["family"]].append((case_id, entry, case["result"]))
    return out


def cell(shim: list[tuple[str, str, str]], stock: list[tuple[str, str, str]]) -> str:
    if not shim:
        return "-"
    results = [result for _, _, result in shim]
    failed = [entry for _, entry, result in shim if result in FAILED]
    refused = [entry for _, entry, result in shim if result == "refused"]
    passed = sum(result == "pass" for result in results)
    if failed:
        via = sorted(set(failed))
        return f"**WRONG**: {len(failed)} of {len(shim)} cases fail with the shim (via {', '.join(via)})"
    if passed == 0 and refused:
        entries = sorted(set(refused))
        return f"refused ({len(refused)} cases, via {', '.join(entries)})"
    stock_result = {key: result for key, _, result in stock}
    shim_passed = [key for key, _, result in shim if result == "pass"]
    stock_failed = [key for key in shim_passed if stock_result.get(key) in FAILED]
    unmeasured = [key for key in shim_passed if key not in stock_result]
    if stock_failed:
        text = f"patched: {passed} pass with the shim, stock fails {len(stock_failed)}"
    else:
        text = f"right: {passed} pass" + (" (stock not run)" if len(unmeasured) == passed else ", stock too")
    if refused:
        text += f"; {len(refused)} refused (via {', '.join(sorted(set(refused)))})"
    unended = sum(result is None for result in results)
    others = len(shim) - passed - len(refused) - unended
    if others:
        text += f"; {others} skipped"
    if unended:
        text += f"; {unended} not ended (the run stopped first)"
    return text


def table(legs: dict, leg_names: list[str] | None = None) -> list[str]:
    names = leg_names or sorted(legs, key=raw_reports.leg_key)
    shim = {leg: _by_family(legs.get(leg, {}).get("shim", {})) for leg in names}
    stock = {leg: _by_family(legs.get(leg, {}).get("stock", {})) for leg in names}
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for family in zoo.FAMILIES:
        row = [LABELS.get(family, family)]
        row += [cell(shim[leg].get(family, []), stock[leg].get(family, [])) for leg in names]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def legs_of_the_matrix() -> list[str]:
    """The legs in the order the tested matrix lists them (read without importing the shim)."""
    import ast

    source = (zoo.PACKAGE_PARENT / "unsloth_qwen_compat" / "_matrix.py").read_text(encoding="utf-8")
    return [
        node.value.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.keyword) and node.arg == "name" and isinstance(node.value, ast.Constant)
    ]


def block_span(text: str) -> tuple[int, int]:
    start = text.index("\n", text.index(START)) + 1
    return start, text.index(END, start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.model_table", description=__doc__)
    parser.add_argument("reports", nargs="?", default=REPORTS_DIR, help=f"default: ./{REPORTS_DIR}")
    parser.add_argument("--readme", type=Path, help="rewrite the models block of this file")
    parser.add_argument(
        "--runs",
        type=Path,
        help="read a GPU run's reports instead (conformance/offline_legs.sh's output directory)",
    )
    parser.add_argument(
        "--cases", action="store_true", help="then list every case that failed or was refused"
    )
    args = parser.parse_args(argv)
    if args.runs is not None:
        legs = read(args.runs, runs_of_a_gpu_run=True)
        print("\n".join(table(legs)))
        if args.cases:
            print(
                "\n".join(
                    ["", "cases that failed, errored or were refused:"] + (not_passed(legs) or ["none"])
                )
            )
        return 0
    reports = Path(args.reports)
    if not reports.is_dir():
        print(f"no {reports}/ here: run this from a checkout of the repository", file=sys.stderr)
        return 1
    lines = table(read(reports), legs_of_the_matrix())
    if args.readme:
        text = args.readme.read_text(encoding="utf-8")
        start, end = block_span(text)
        args.readme.write_text(text[:start] + "\n".join(lines) + "\n" + text[end:], encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
