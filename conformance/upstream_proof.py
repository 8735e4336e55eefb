"""The retire proof: stock Unsloth with the shim vs Unsloth with the upstream series, shim off.

    python3 -m conformance.upstream_proof compare SHIM.json UPSTREAM.json [--out DIR]
    python3 -m conformance.upstream_proof merge A.json B.json ... -o MERGED.json [--rerun]

``compare`` reads two ``conformance.json`` reports (report.py): the shim's run on the stock
release, and the run on the patched release (``conformance/build_patched_unsloth.sh``) with
``UNSLOTH_QWEN_COMPAT_DISABLE=1``. The upstream fixes are proven when the patched run, on its
own, has what the shim gave: every case they both ran ends the same way (pass, refused, skip),
with its measured errors side by side. One difference is explained rather than failed: a
non-Qwen control cell of the RoPE grid, which the shim leaves to stock Unsloth (its run checks
"equal to stock"), is held to the contract by the patched release (the series fixes every
model type), so it may end ``refused`` there where the contract allows a refusal. Exit 0 when
the patched run has no failure and every other outcome matches; the table goes to stdout and,
with ``--out``, to ``DIR/compare.md`` and ``DIR/compare.json``.

``merge`` joins the reports of runs that each ran part of the suite (the proof in several
commands, each within a time limit) into one report, as if one run had run them all: the
header of the first, every case (a case in two reports is an error), the counts recomputed.
``merge --rerun`` puts re-runs over a whole run's report: the cases a stopped run left
unended, or cases run again after their test changed; the later result wins and the report
lists which cases came from which part (``reran``).
Imports neither torch nor Unsloth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from conformance import raw_reports

#: Case-name prefix of the RoPE grid's non-Qwen controls (conformance/rope_grid.py CONTROL_FAMILIES).
CONTROL_PREFIXES = ("test_rope_grid[llama-", "test_rope_grid[mistral-")
#: The shim run's metric on a control cell: equal to stock Unsloth, bit for bit.
CONTROL_METRIC = "control_shim_vs_stock_max_abs"
#: Verdicts that leave the proof unproven: the proof is "the same cases, ending the same way".
FAILING = ("FAILS in the patched run", "DIFFERENT", "only in the shim run", "only in the patched run")


def case_name(case: dict[str, Any]) -> str:
    """The case id without pytest-xdist's ``@<group>`` suffix."""
    return case["case"].split("@")[0]


def _cases(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {case_name(case): case for case in report.get("cases", [])}


def _metrics(case: dict[str, Any] | None) -> dict[str, float]:
    if case is None:
        return {}
    return {
        m["metric"]: m["value"] for m in case.get("metrics", []) if isinstance(m.get("value"), (int, float))
    }


def _text(case: dict[str, Any] | None) -> str:
    if case is None:
        return "not run"
    metrics = ", ".join(f"{k} {v:.3g}" for k, v in _metrics(case).items())
    if not metrics and case.get("reason"):
        metrics = case["reason"].replace("|", "/").splitlines()[0][:100]
    return f"{case['result']}: {metrics}" if metrics else case["result"]


def _bounds(*cases: dict[str, Any] | None) -> dict[str, float]:
    bounds: dict[str, float] = {}
    for case in cases:
        for m in (case or {}).get("metrics", []):
            if isinstance(m.get("bound"), (int, float)):
                bounds[m["metric"]] = max(bounds.get(m["metric"], 0.0), float(m["bound"]))
    return bounds


#: A value under this share of its metric's bound, or under fp32's last bit (2**-23, where a
#: relative error is the rounding of the result itself), is at the metric's floor.
RATIO_FLOOR = 0.01
FP32_LAST_BIT = 2.0**-23


def _ratio(a: dict[str, float], b: dict[str, float], bounds: dict[str, float] | None = None) -> float | None:
    """Largest ratio between the two runs' values of a metric they share (1 = the same). Values
    under the floor (RATIO_FLOOR of the metric's bound, at least FP32_LAST_BIT) count as the
    floor: an fp32 LoRA loss 0 in one run and 1.3e-7 in the other (measured on an H200, bound
    1e-6) is one result, not a ratio of 1e5."""
    ratios = []
    for key in set(a) & set(b):
        floor = max(FP32_LAST_BIT, RATIO_FLOOR * (bounds or {}).get(key, 0.0))
        x, y = abs(a[key]), abs(b[key])
        if max(x, y) <= floor:
            continue
        ratios.append(max(x, y) / max(min(x, y), floor))
    return max(ratios) if ratios else None


def compare(shim: dict[str, Any], upstream: dict[str, Any]) -> dict[str, Any]:
    """Per case: same / explained / DIFFERENT, plus what ran in only one report."""
    mine, theirs = _cases(shim), _cases(upstream)
    rows = []
    for name in sorted(set(mine) | set(theirs)):
        a, b = mine.get(name), theirs.get(name)
        if a is None or b is None:
            verdict = "only in the shim run" if b is None else "only in the patched run"
        elif b["result"] in ("fail", "error"):
            verdict = "FAILS in the patched run"
        elif a["result"] == b["result"]:
            verdict = "same"
        elif name.startswith(CONTROL_PREFIXES) and CONTROL_METRIC in _metrics(a) and b["result"] == "refused":
            verdict = "explained: control held to the contract, refused"
        elif a["result"] in ("fail", "error"):
            verdict = "better in the patched run"
        else:
            verdict = "DIFFERENT"
        rows.append(
            {
                "case": name,
                "verdict": verdict,
                "shim_on_stock": _text(a),
                "patched_shim_off": _text(b),
                "metric_ratio": _ratio(_metrics(a), _metrics(b), _bounds(a, b)) if a and b else None,
            }
        )
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    failing = [r for r in rows if r["verdict"] in FAILING]
    ratios = [r["metric_ratio"] for r in rows if r["verdict"] == "same" and r["metric_ratio"] is not None]
    # A run stopped by its time limit holds only the cases it finished: two such runs can agree
    # on every case they both reached and still prove nothing about the rest.
    incomplete = {
        label: raw_reports.unfinished(report)
        or "the report does not record how many cases were selected (written by an older suite)"
        for label, report in (("shim on stock", shim), ("patched, shim off", upstream))
        if not raw_reports.is_complete(report)
    }
    return {
        "shim_on_stock": _header(shim),
        "patched_shim_off": _header(upstream),
        "counts": counts,
        "incomplete": incomplete,
        "proven": not failing and not incomplete and bool(set(mine) & set(theirs)),
        "largest_metric_ratio_of_same_cases": max(ratios) if ratios else None,
        "rows": rows,
    }


def _header(report: dict[str, Any]) -> dict[str, Any]:
    versions = report.get("versions", {})
    shim = report.get("shim", {})
    return {
        "unsloth": versions.get("unsloth"),
        "transformers": versions.get("transformers"),
        "gpu": versions.get("gpu"),
        "dtype": report.get("dtype"),
        "shim_enabled": shim.get("enabled"),
        "counts": report.get("counts"),
        "pytest_args": report.get("pytest_args"),
    }


def render(result: dict[str, Any]) -> str:
    lines = ["# Retire proof: shim on stock Unsloth vs the upstream series with the shim off", ""]
    for key, title in (("shim_on_stock", "shim on stock"), ("patched_shim_off", "patched, shim off")):
        h = result[key]
        lines.append(
            f"- {title}: unsloth {h['unsloth']}, transformers {h['transformers']}, {h['gpu']}, {h['dtype']}, "
            f"shim enabled: {h['shim_enabled']}; counts {h['counts']}"
        )
    lines += ["", "| verdict | cases |", "|---|---|"]
    lines += [f"| {verdict} | {n} |" for verdict, n in sorted(result["counts"].items())]
    ratio = result["largest_metric_ratio_of_same_cases"]
    lines += [
        "",
        "Largest ratio of a measured error between the runs, over cases that ended the same: "
        + (f"{ratio:.3g}" if ratio is not None else "none measured"),
        "",
        "PROVEN: the patched Unsloth alone gives what the shim gave"
        if result["proven"]
        else "NOT PROVEN: "
        + "; ".join(
            [f"{run} run incomplete ({why})" for run, why in result.get("incomplete", {}).items()]
            + ["see the rows marked FAILS, DIFFERENT or only in one run"]
        ),
        "",
        "| case | verdict | shim on stock | patched, shim off |",
        "|---|---|---|---|",
    ]
    order = dict.fromkeys(FAILING, 0)
    for row in sorted(result["rows"], key=lambda r: (order.get(r["verdict"], 1), r["case"])):
        lines.append(
            f"| `{row['case']}` | {row['verdict']} | {row['shim_on_stock']} | {row['patched_shim_off']} |"
        )
    return "\n".join(lines) + "\n"


def _k_selection(report: dict[str, Any]):
    """The cases a run's ``-k`` expressions selected, as a test on a node id (pytest's own
    parser, names matched as substrings), or None where it had none (every case). A merge
    selected what any of its joined parts did."""
    from _pytest.mark.expression import Expression  # pytest's own -k parser

    tests = []
    for part in raw_reports.joined_parts(report):
        expressions = raw_reports.k_expressions(part.get("pytest_args"))
        if not expressions:
            return None
        tests.append([Expression.compile(expression) for expression in expressions])
    return lambda nodeid: any(
        all(e.evaluate(lambda name: name.lower() in nodeid.lower()) for e in compiled) for compiled in tests
    )


def merge(reports: list[dict[str, Any]], sources: list[str], rerun: bool = False) -> dict[str, Any]:
    """Join part reports. Without ``rerun`` the parts ran different cases (a case in two is an
    error). With ``rerun`` the first report is the whole selection and each later one re-ran
    some of its cases (those a stopped run left unended, or whose test changed since): a case
    a later part ended replaces the earlier one, and the report is complete when every case
    the first selected has ended. A re-run's case that the first run's ``-k`` did not select
    is left out (listed in ``outside_selection``): a re-run may have selected more."""
    if not reports:
        raise ValueError("nothing to merge")
    seen: dict[str, str] = {}
    by_name: dict[str, dict[str, Any]] = {}
    reran: dict[str, str] = {}
    selected = _k_selection(reports[0]) if rerun else None
    outside: dict[str, str] = {}
    for index, (report, source) in enumerate(zip(reports, sources)):
        for case in report.get("cases", []):
            name = case_name(case)
            if index and selected is not None and not selected(case.get("nodeid") or case["case"]):
                outside[name] = source  # a re-run selects nothing new: not part of this whole
                continue
            if name in seen and not rerun:
                raise ValueError(
                    f"{name} is in both {seen[name]} and {source}: merge parts that ran different cases"
                )
            if name in seen:
                if not case.get("result"):
                    continue  # a re-run stopped inside it: the earlier result stands
                reran[name] = source
            seen[name] = source
            by_name[name] = case
    cases = list(by_name.values())
    first = reports[0]
    for report, source in zip(reports[1:], sources[1:]):
        for key in ("dtype", "candidate_mode", "device", "mutation"):
            if report.get(key) != first.get(key):
                raise ValueError(f"{source}: {key} {report.get(key)!r} differs from {first.get(key)!r}")
        if report.get("versions", {}).get("unsloth") != first.get("versions", {}).get("unsloth"):
            raise ValueError(f"{source}: another Unsloth than {sources[0]}")
    counts: dict[str, int] = {}
    for case in cases:
        counts[case["result"]] = counts.get(case["result"], 0) + 1
    args: list[str] = []
    for report in reports:
        args += report.get("pytest_args", [])
    # What is still left: the later parts' running and never-started cases that no part
    # ended (a part's own lists can name cases that a later re-run ended).
    ended_ids = {case.get("nodeid") for case in cases if case.get("result")}
    running = {
        entry["nodeid"]: entry
        for report in reports
        for entry in report.get("running", [])
        if entry["nodeid"] not in ended_ids
    }
    case_ids = {case.get("nodeid") for case in cases}
    not_started = [
        nodeid
        for nodeid in dict.fromkeys(n for report in reports for n in report.get("not_started", []))
        if nodeid not in ended_ids and nodeid not in running and nodeid not in case_ids
    ]
    if rerun:
        # The first report's selection is the whole; complete when every case of it has ended.
        collected = first.get("collected")
        if isinstance(collected, int) and len(cases) > collected:
            raise ValueError(
                f"{len(cases)} cases, more than the {collected} {sources[0]} selected: not a re-run of it"
            )
        ended = sum(1 for case in cases if case.get("result"))
        completion = {
            "reran": reran,
            **({"outside_selection": outside} if outside else {}),
            "collected": collected,
            "finished_cases": ended,
            "interrupted": not isinstance(collected, int) or ended < collected,
        }
    else:
        # Complete only if every part is: each part's selected cases add up, any stop stops it.
        completion = {
            "collected": sum(r["collected"] for r in reports)
            if all(isinstance(r.get("collected"), int) for r in reports)
            else None,
            "interrupted": any(bool(r.get("interrupted")) for r in reports),
        }
    return {
        **first,
        "pytest_args": args,
        # A part that is itself a merge names its own parts: the list is of runs, not of files.
        # A re-run part is marked: it selected nothing the first did not (raw_reports.selection).
        "merged_from": [
            {**entry, **({"rerun": True} if rerun and index else {})}
            for index, (r, s) in enumerate(zip(reports, sources))
            for entry in r.get("merged_from")
            or [{"source": s, "date": r.get("date"), "pytest_args": r.get("pytest_args")}]
        ],
        "finished": max(str(r.get("finished", "")) for r in reports),
        "running": list(running.values()),
        "not_started": not_started,
        **completion,
        "seconds": round(sum(float(r.get("seconds", 0.0)) for r in reports), 1),
        "counts": counts,
        "cases": cases,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m conformance.upstream_proof", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="the patched run (shim off) against the shim's run on stock")
    c.add_argument("shim", type=Path, help="conformance.json of the shim on stock Unsloth")
    c.add_argument("upstream", type=Path, help="conformance.json of the patched Unsloth, shim disabled")
    c.add_argument("--out", type=Path, help="also write DIR/compare.md and DIR/compare.json")
    m = sub.add_parser("merge", help="join reports of runs that ran different parts of the suite")
    m.add_argument("reports", type=Path, nargs="+")
    m.add_argument("-o", "--output", type=Path, required=True)
    m.add_argument(
        "--rerun",
        action="store_true",
        help="the first report is the whole selection; later ones re-ran some of its cases (they win)",
    )
    args = parser.parse_args(argv)
    if args.command == "merge":
        data = [json.loads(p.read_text(encoding="utf-8")) for p in args.reports]
        try:
            merged = merge(data, [str(p) for p in args.reports], rerun=args.rerun)
        except ValueError as error:
            print(f"merge: {error}", file=sys.stderr)
            return 2
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
        print(f"{args.output}: {len(merged['cases'])} cases {merged['counts']}")
        return 0
    missing = [str(p) for p in (args.shim, args.upstream) if not p.is_file()]
    if missing:
        print(f"compare: no report at {', '.join(missing)} (did the run start?)", file=sys.stderr)
        return 2
    result = compare(
        json.loads(args.shim.read_text(encoding="utf-8")),
        json.loads(args.upstream.read_text(encoding="utf-8")),
    )
    text = render(result)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.md").write_text(text, encoding="utf-8")
        (args.out / "compare.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    head = text.split("| case | verdict |")[0]
    print(head.rstrip())
    shown = [r for r in result["rows"] if r["verdict"] not in ("same",)]
    for row in shown[:40]:
        print(
            f"  {row['verdict']:<48} {row['case']}\n      shim: {row['shim_on_stock']}\n      patched: {row['patched_shim_off']}"
        )
    return 0 if result["proven"] else 1


if __name__ == "__main__":
    sys.exit(main())
