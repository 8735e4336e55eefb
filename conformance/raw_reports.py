"""The committed raw reports, ``conformance-reports/<leg>/<run>[.<dtype>].json``, read as data.

``<leg>`` is a leg of tox.ini (``2026.10``); ``<run>`` is ``shim``, ``stock`` (the shim
disabled) or ``mutation-<name>`` (the shim with a deliberate defect, conformance/mutations.py).
Each file is the ``conformance.json`` a run wrote (report.py): a header (date, dtype,
pytest_args, mutation, versions, shim status) and one record per case. The dtype is the
header's; a file name may carry it too (``mutation-rope-base-1pct.bf16.json``), so runs of
one kind in two dtypes sit side by side, and it must then agree with the header.

Only the documents' generators read these (conformance/document.py, conformance/rope_table.py,
unsloth_qwen_compat/_legs_table.py): they exist in a checkout, not in a wheel.
``python -m conformance.raw_reports unended REPORT.json`` reads any run's report, installed or
in a checkout: it prints the ``-k`` that re-runs what a stopped run left.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Where a checkout keeps the raw reports, relative to its root.
REPORTS_DIR = "conformance-reports"
DTYPES = ("fp32", "bf16", "fp16")
#: Result counts in this order, then any other; ``fail`` is always shown.
RESULT_ORDER = ("pass", "refused", "skip", "xfail", "fail", "error")
#: pytest options that select cases (shown) and others that take a value (skipped).
_SELECTING = ("-m", "-k")
_TAKES_VALUE = {"-p", "-n", "-c", "-r", "--dist", "--tb", "--rootdir", "--conformance-report", "--maxfail"}


class ReportError(ValueError):
    pass


@dataclass(frozen=True)
class Run:
    leg: str
    kind: str  # "shim", "stock" or "mutation"
    mutation: str  # the mutation's name ("" unless kind == "mutation")
    dtype: str
    path: Path
    data: dict[str, Any]

    @property
    def label(self) -> str:
        return f"mutation {self.mutation}" if self.kind == "mutation" else self.kind

    @property
    def cases(self) -> list[dict[str, Any]]:
        return self.data.get("cases", [])


def case_name(case: dict[str, Any]) -> str:
    """The case id without pytest-xdist's ``@<group>`` suffix."""
    return case["case"].split("@")[0]


def leg_key(leg: str) -> list[int]:
    """Sort key: newest leg first (2026.10, 2025.10, 2025.3)."""
    return [-int(part) if part.isdigit() else 0 for part in re.split(r"[.-]", leg)]


def parse(path: Path, leg: str, stem: str | None = None) -> Run:
    """One report; ``stem`` names the run where the file name does not (``conformance.json``)."""
    stem, dtype_in_name = stem or path.stem, ""
    head, _, tail = stem.rpartition(".")
    if head and tail in DTYPES:
        stem, dtype_in_name = head, tail
    data = json.loads(path.read_text(encoding="utf-8"))
    dtype = data.get("dtype", "")
    if dtype_in_name and dtype_in_name != dtype:
        raise ReportError(f"{path}: the name says {dtype_in_name}, the report's header {dtype!r}")
    if stem in ("shim", "stock"):
        if data.get("mutation"):
            raise ReportError(
                f"{path}: a {stem} run with mutation {data['mutation']!r}: name it mutation-<name>.json"
            )
        return Run(leg, stem, "", dtype, path, data)
    if stem.startswith("mutation-"):
        name = data.get("mutation") or stem.removeprefix("mutation-")
        return Run(leg, "mutation", name, dtype, path, data)
    raise ReportError(f"{path}: not a report name (shim, stock or mutation-<name>, optionally .<dtype>)")


def read(reports: Path) -> dict[str, list[Run]]:
    """``{leg: [Run, ...]}``, newest leg first; runs as shim, stock, then mutations by name and dtype."""
    legs: dict[str, list[Run]] = {}
    for path in sorted(reports.glob("*/*.json")):
        run = parse(path, path.parent.name)
        legs.setdefault(run.leg, []).append(run)
    for leg, runs in legs.items():
        seen: dict[tuple, Path] = {}
        for run in runs:
            key = (run.kind, run.mutation, run.dtype)
            if key in seen:
                raise ReportError(
                    f"{seen[key].name} and {run.path.name} in {reports / leg}: two {run.label} runs in "
                    f"{run.dtype}; keep the latest (git keeps the other)"
                )
            seen[key] = run.path
        order = {"shim": 0, "stock": 1, "mutation": 2}
        runs.sort(
            key=lambda r: (order[r.kind], r.mutation, DTYPES.index(r.dtype) if r.dtype in DTYPES else 9)
        )
    return {leg: legs[leg] for leg in sorted(legs, key=leg_key)}


def _selection_of_args(pytest_args: list[str]) -> list[str]:
    parts, args = [], iter(pytest_args or [])
    for arg in args:
        if arg in _SELECTING:
            parts.append(f"`{arg} {next(args, '')}`")
        elif arg in _TAKES_VALUE:
            next(args, None)
        elif not arg.startswith("-") and ".py" in arg:  # a test file or node id, not the suite
            path, _, node = arg.partition("::")
            parts.append(f"`{Path(path).name}{'::' + node if node else ''}`")
    return parts


def joined_parts(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs whose selections a report holds: itself, or a merge's joined parts
    (conformance/upstream_proof.py; its re-runs select nothing new)."""
    merged = report.get("merged_from")
    return [part for part in merged if not part.get("rerun")] if merged else [report]


def k_expressions(pytest_args: list[str] | None) -> list[str]:
    """The ``-k`` expressions of a run's pytest arguments."""
    args = list(pytest_args or [])
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "-k"]


def _complementary(parts: list[dict[str, Any]]) -> bool:
    """Two runs that selected only ``-k X`` and ``-k not (X)``: together, every case."""
    if len(parts) != 2 or any(len(_selection_of_args(part.get("pytest_args"))) != 1 for part in parts):
        return False
    expressions = [k_expressions(part.get("pytest_args")) for part in parts]
    if any(len(found) != 1 for found in expressions):
        return False
    first, second = (found[0].strip() for found in expressions)
    return second == f"not ({first})" or first == f"not ({second})"


def selection(report: dict[str, Any]) -> str:
    """The cases a run selected, from its pytest arguments: ``-m`` / ``-k`` expressions and
    test files, or "every case". A merge selected what its joined parts did: every case where
    one selected every case, or they were ``-k X`` and ``-k not (X)``."""
    parts = joined_parts(report)
    selections = [_selection_of_args(part.get("pytest_args")) for part in parts]
    if _complementary(parts) or any(not found for found in selections):
        return "every case"
    return " + ".join(" ".join(found) for found in selections)


def dates(report: dict[str, Any]) -> str:
    """The day a run ran, or the first and last day of a merge's parts ("2026-12-02 to 2026-12-03")."""
    days = sorted({str(part.get("date", ""))[:10] for part in report.get("merged_from", [])} - {""})
    if len(days) > 1:
        return f"{days[0]} to {days[-1]}"
    return str(report.get("date", ""))[:10]


def unfinished(report: dict[str, Any]) -> str:
    """Why a run's report does not hold every case it selected ("" when it does): stopped
    before the end (a time limit's SIGINT), or cases selected that have no result. Reports
    written before these fields existed say nothing either way ("")."""
    cases = report.get("cases", [])
    ended = sum(1 for case in cases if case.get("result"))
    collected = report.get("collected")
    if report.get("interrupted"):
        of = f" of {collected}" if isinstance(collected, int) else ""
        return f"interrupted after {ended}{of} cases"
    if isinstance(collected, int) and ended < collected:
        return f"{ended} of {collected} cases ended"
    return ""


def unended(report: dict[str, Any]) -> list[str]:
    """The node ids of the cases a run selected and did not end: those it was inside when it
    stopped and those it never started (reports written since ``not_started`` existed)."""
    ended = {case["nodeid"] for case in report.get("cases", []) if case.get("result")}
    ids = [case["nodeid"] for case in report.get("cases", [])]
    ids += [case["nodeid"] for case in report.get("running", [])]
    ids += report.get("not_started", [])
    return list(dict.fromkeys(i for i in ids if i not in ended))


# What pytest's -k takes as one name (_pytest.mark.expression's identifier).
_K_IDENT = re.compile(r"(?:\w|:|\+|-|\.|\[|\]|\\|/)+")


def rerun_expression(nodeids: list[str]) -> str:
    """A pytest ``-k`` expression that selects these cases: each case's full name, parameters
    included (pytest-xdist's ``@group`` suffix dropped). A name with characters ``-k`` cannot
    spell (``prompts[29, 14, 6, 3]``) becomes the ``and`` of its spellable pieces, which may
    also select a sibling whose name holds the same pieces: a re-run of one case more, never
    one fewer. A ``-k`` rather than node ids, so that the re-run's report says what it selected
    and ``upstream_proof merge --rerun`` can place it."""
    terms = []
    for name in dict.fromkeys(nodeid.split("::")[-1].split("@")[0] for nodeid in nodeids):
        pieces = _K_IDENT.findall(name)
        terms.append(pieces[0] if len(pieces) == 1 else "(" + " and ".join(pieces) + ")")
    return " or ".join(terms)


def is_complete(report: dict[str, Any]) -> bool:
    """Whether the report positively says that every selected case ended (new fields present,
    not interrupted): what a proof that compares two runs needs."""
    return isinstance(report.get("collected"), int) and not unfinished(report)


def is_partial(report: dict[str, Any]) -> bool:
    """Whether the run selected part of the suite (its pytest arguments say so)."""
    return selection(report) != "every case"


def ended_counts(report: dict[str, Any]) -> dict[Any, int]:
    """The report's counts by result of the cases that ended. A case without a result (running
    when the run stopped) is no result: :func:`not_ended` says it, with those never started."""
    return {result: n for result, n in report.get("counts", {}).items() if result not in (None, "null")}


def not_ended(report: dict[str, Any]) -> str:
    """E.g. "12 not ended": how many of the selection a stopped run left ("" when none)."""
    left = unended(report)
    return f"{len(left)} not ended" if left else ""


def counts(report: dict[str, Any]) -> str:
    """E.g. "87 pass, 4 refused, 0 fail": every result that occurred, and fail always."""
    found = {"fail": 0, **ended_counts(report)}
    order = [r for r in RESULT_ORDER if r in found] + sorted(set(found) - set(RESULT_ORDER), key=str)
    text = ", ".join(f"{found[r]} {r}" for r in order if found[r] or r == "fail")
    return ", ".join(filter(None, [text, not_ended(report)]))


def main(argv: list[str] | None = None) -> int:
    """``python -m conformance.raw_reports unended REPORT.json``: print the ``-k`` expression that
    re-runs what a stopped run left (nothing, exit 1, when every case ended)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m conformance.raw_reports", description=main.__doc__)
    parser.add_argument("command", choices=["unended"])
    parser.add_argument("report", type=Path, help="a run's conformance.json")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text(encoding="utf-8"))
    if unfinished(report) and "not_started" not in report:
        print(
            f"{args.report}: {unfinished(report)}, and it was written before reports named the cases "
            "they never started: re-run its whole selection",
            file=sys.stderr,
        )
        return 2
    left = unended(report)
    if not left:
        return 1
    print(rerun_expression(left))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
