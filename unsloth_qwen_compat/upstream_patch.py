"""``upstream-patch --out DIR``: each fix the installed Unsloth still needs, as a change to Unsloth.

The shim exists to be retired. For every defect its probes find in the installed release,
this writes the fix as a unified diff against that release's own source (Unsloth's style, in
Unsloth's files, no shim), a diff adding regression tests where Unsloth keeps its tests, and a
PR description: the defect as the probe found it, a reproduction, and the measured error before
and after, read from committed conformance reports (nothing is made up when they are absent).

The diffs live in ``upstream_series/<release>/`` (``series.json`` lists them in order). Each
applies on its own or after the ones before it to the unpacked wheel of that release
(``git apply`` or ``patch -p1`` in the folder holding ``unsloth/``); the ``*.tests.diff`` apply
to the ``tests/`` tree of the upstream commit ``series.json`` names (the wheels carry no tests).
``conformance/build_patched_unsloth.sh`` builds the patched wheel from them, the leg
``<leg>-upstream`` of ``conformance/offline_legs.sh``; once upstream ships a fix, the probe of
that defect says ``native`` and this command leaves it out.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._env import parse_version, release_of
from ._matrix import LEGS
from ._registry import Patch, Verdict
from .upstream import _load

SERIES_ROOT = Path(__file__).resolve().parent / "upstream_series"
#: A checkout's committed reports (conformance-reports/<leg>/<mode>.json).
CHECKOUT_REPORTS = Path(__file__).resolve().parent.parent / "conformance-reports"


class SeriesError(ValueError):
    """There is no patch series for this Unsloth, or it is broken."""


@dataclass(frozen=True)
class SeriesEntry:
    patch: str
    title: str
    diff: Path
    tests: Path
    description: Path


@dataclass(frozen=True)
class Series:
    unsloth: str
    root: Path
    source: str
    local_version: str
    tests_repository: str
    tests_commit: str
    tests_why: str
    entries: tuple[SeriesEntry, ...]

    def entry(self, patch: str) -> SeriesEntry | None:
        return next((e for e in self.entries if e.patch == patch), None)


def releases() -> list[str]:
    """Unsloth releases with a patch series in this package."""
    return sorted(p.parent.name for p in SERIES_ROOT.glob("*/series.json"))


def load_series(unsloth: str) -> Series:
    """The series for Unsloth ``unsloth`` (a local label such as ``+qwencompat`` is ignored)."""
    version = parse_version(unsloth)
    release = str(release_of(version)) if version is not None else unsloth
    root = SERIES_ROOT / release
    if not (root / "series.json").is_file():
        have = ", ".join(releases()) or "none"
        raise SeriesError(
            f"no upstream patch series for Unsloth {unsloth} in this unsloth-qwen-compat (series exist for: "
            f"{have}). `upstream-report` still describes each defect; a series for another release is "
            "written against that release's own source."
        )
    data = json.loads((root / "series.json").read_text(encoding="utf-8"))
    entries = []
    for item in data["patches"]:
        files = {key: root / item[key] for key in ("diff", "tests", "description")}
        missing = [str(path) for path in files.values() if not path.is_file()]
        if missing:
            raise SeriesError(f"series {release} is missing {', '.join(missing)}")
        entries.append(SeriesEntry(item["patch"], item["title"], **files))
    tests = data["tests_base"]
    return Series(
        unsloth=data["unsloth"],
        root=root,
        source=data["source"],
        local_version=data["local_version"],
        tests_repository=tests["repository"],
        tests_commit=tests["commit"],
        tests_why=tests["why"],
        entries=tuple(entries),
    )


# -- measured numbers, from committed reports ---------------------------------------------------


def leg_of(unsloth: str) -> str | None:
    """The tested leg whose Unsloth release this is (its reports are ``<leg>/`` and ``<leg>-upstream/``)."""
    version = parse_version(unsloth)
    if version is None:
        return None
    release = release_of(version)
    return next((leg.name for leg in LEGS if parse_version(leg.unsloth) == release), None)


def _columns(reports: Path | None, leg: str | None) -> list[tuple[str, Path]]:
    """(column heading, report file) for stock, the shim, and the patched Unsloth with the shim off."""
    if reports is None or leg is None:
        return []
    return [
        (f"stock Unsloth (`{leg}/stock.json`)", reports / leg / "stock.json"),
        (f"with the shim (`{leg}/shim.json`)", reports / leg / "shim.json"),
        (
            f"with this patch, shim off (`{leg}-upstream/stock.json`)",
            reports / f"{leg}-upstream" / "stock.json",
        ),
    ]


def _outcome(case: dict[str, Any] | None) -> str:
    if case is None:
        return "not run"
    metrics = ", ".join(
        f"{m['metric']} {m['value']:.3g}"
        + (f" (bound {m['bound']:.3g})" if m.get("bound") is not None else "")
        for m in case.get("metrics", [])
    )
    if not metrics and case.get("reason"):
        metrics = case["reason"].replace("|", "/").splitlines()[0][:120]
    return f"{case['result']}: {metrics}" if metrics else case["result"]


def _selection(pytest_args: list[str]) -> str:
    """The part of the suite a run selected (``-m rope``, ``-k ...``), else the whole suite."""
    picked = [f"{flag} {value}" for flag, value in zip(pytest_args, pytest_args[1:]) if flag in ("-m", "-k")]
    return " ".join(picked) or "the whole suite"


def _header_line(data: dict[str, Any]) -> str:
    versions = data.get("versions", {})
    return (
        f"{data.get('date', '?')[:10]}, {versions.get('gpu') or data.get('device', '?')}, "
        f"unsloth {versions.get('unsloth')}, transformers {versions.get('transformers')}, "
        f"{data.get('dtype')}, {_selection(data.get('pytest_args', []))}"
    )


def measured(patch: Patch, reports: Path | None, leg: str | None) -> str:
    """The ``## Measured`` section: per report, its header and counts over this patch's cases,
    then every case whose outcome is not a pass in all reports at hand."""
    columns = [(title, path) for title, path in _columns(reports, leg) if path.is_file()]
    if not columns:
        where = reports if reports is not None else "conformance-reports/"
        return (
            f"No committed conformance report for this release in `{where}` (leg {leg or 'unknown'}): "
            "run the suite on a GPU (`conformance/upstream_proof.sh`), or pass `--reports DIR`."
        )
    cases = {title: _load(path) for title, path in columns}
    headers = {title: json.loads(path.read_text(encoding="utf-8")) for title, path in columns}
    names = sorted(
        {name for table in cases.values() for name in table if name.startswith(patch.conformance_cases)}
    )
    lines = []
    for title, _ in columns:
        mine = [cases[title][n] for n in names if n in cases[title]]
        counts: dict[str, int] = {}
        for case in mine:
            counts[case["result"]] = counts.get(case["result"], 0) + 1
        tally = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none of these cases"
        lines.append(f"- {title}: {len(mine)} cases: {tally} ({_header_line(headers[title])})")
    if not names:
        return "\n".join(lines + ["", "None of the reports holds this patch's cases."])
    shown = [
        n for n in names if any(cases[t].get(n, {}).get("result") not in ("pass", None) for t, _ in columns)
    ]
    lines += ["", f"Cases not passing in every report ({len(shown)} of {len(names)}):", ""]
    if not shown:
        return "\n".join(lines[:-2] + ["", f"All {len(names)} cases pass in every report."])
    lines.append("| case | " + " | ".join(title for title, _ in columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    for name in shown:
        lines.append(f"| `{name}` | " + " | ".join(_outcome(cases[t].get(name)) for t, _ in columns) + " |")
    return "\n".join(lines)


# -- writing the series ------------------------------------------------------------------------


def _description(
    entry: SeriesEntry,
    patch: Patch,
    status_entry: dict[str, Any],
    report: dict[str, Any],
    reports: Path | None,
    leg: str | None,
) -> str:
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    gpu = env["gpu"]["name"] if env["gpu"] else "no GPU (verdicts from inspecting Unsloth's GPU code)"
    text = entry.description.read_text(encoding="utf-8")
    replacements = {
        "<!-- probe -->": f"{status_entry['reason']}.",
        "<!-- reproduction -->": "```python\n" + patch.reproduction.rstrip() + "\n```",
        "<!-- measured -->": measured(patch, reports, leg),
        "<!-- versions -->": f"Probed on: {versions}; {gpu}.",
    }
    for marker, value in replacements.items():
        if marker not in text:
            raise SeriesError(f"{entry.description} lacks the {marker} marker")
        text = text.replace(marker, value)
    return text


def write(
    out: Path,
    report: dict[str, Any],
    patches: dict[str, Patch],
    reports: Path | None = None,
) -> list[str]:
    """Write the series for what ``report`` (a ``status()``) says is needed into ``out``.

    Returns the patch names written. ``out`` gets, per needed patch with a diff and in series
    order, ``NNNN-<patch>.diff``, ``NNNN-<patch>.tests.diff`` and ``NNNN-<patch>.md``; a
    ``series`` file (the source diffs in order) and a ``README.md`` saying what is there.
    """
    unsloth = report["environment"]["versions"].get("unsloth")
    if not unsloth:
        raise SeriesError("Unsloth is not installed: there is nothing to patch")
    series = load_series(unsloth)
    leg = leg_of(unsloth)
    if reports is None and CHECKOUT_REPORTS.is_dir():
        reports = CHECKOUT_REPORTS
    verdicts = {entry["name"]: entry for entry in report["patches"]}
    needed = [name for name, entry in verdicts.items() if entry["verdict"] == Verdict.NEEDED.value]
    unjudged = [
        name
        for name, entry in verdicts.items()
        if entry["verdict"] not in (Verdict.NEEDED.value, Verdict.NATIVE.value)
    ]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for entry in series.entries:
        if entry.patch not in needed:
            continue
        stem = f"{len(written) + 1:04d}-{entry.patch}"
        shutil.copyfile(entry.diff, out / f"{stem}.diff")
        shutil.copyfile(entry.tests, out / f"{stem}.tests.diff")
        (out / f"{stem}.md").write_text(
            _description(entry, patches[entry.patch], verdicts[entry.patch], report, reports, leg),
            encoding="utf-8",
        )
        written.append(entry.patch)
    (out / "series").write_text(
        "".join(f"{i + 1:04d}-{name}.diff\n" for i, name in enumerate(written)), encoding="utf-8"
    )
    without_diff = [name for name in needed if series.entry(name) is None]
    (out / "README.md").write_text(
        _readme(series, unsloth, written, without_diff, unjudged, verdicts), encoding="utf-8"
    )
    return written


def _readme(
    series: Series,
    unsloth: str,
    written: list[str],
    without_diff: list[str],
    unjudged: list[str],
    verdicts: dict[str, dict[str, Any]],
) -> str:
    lines = [f"# Upstream patches for Unsloth {unsloth}", ""]
    if written:
        lines += [
            "Each defect the probes found in the installed Unsloth, fixed in Unsloth's own source:",
            "",
            *(f"- `{i + 1:04d}-{name}`: {series.entry(name).title}" for i, name in enumerate(written)),  # type: ignore[union-attr]
            "",
            f"`NNNN-<patch>.diff` applies to the unpacked `unsloth-{series.unsloth}` wheel ({series.source}), "
            "alone or in the order of `series`:",
            "",
            "```bash",
            f"pip download unsloth=={series.unsloth} --no-deps -d wheel && unzip -q wheel/*.whl -d src && cd src",
            "for d in $(cat ../series); do git apply ../$d; done   # or: patch -p1 < ../$d",
            "```",
            "",
            f"`NNNN-<patch>.tests.diff` adds the regression tests to `tests/` of {series.tests_repository} at "
            f"{series.tests_commit} ({series.tests_why}). `NNNN-<patch>.md` is the PR description.",
            "",
            "In a checkout of unsloth-qwen-compat, `conformance/build_patched_unsloth.sh` builds the patched "
            f"wheel ({series.local_version}) and `conformance/upstream_proof.sh` runs the conformance suite "
            "on it with the shim disabled.",
        ]
    else:
        lines += ["No defect with a diff in this series is left in the installed Unsloth."]
    if without_diff:
        lines += [
            "",
            f"Needed, but with no upstream diff in this series: {', '.join(without_diff)} (see `upstream-report`).",
        ]
    if unjudged:
        lines += [
            "",
            "Not judged here: "
            + "; ".join(
                f"{name} ({verdicts[name]['verdict']}: {verdicts[name]['reason']})" for name in unjudged
            ),
        ]
    native = [name for name, entry in verdicts.items() if entry["verdict"] == Verdict.NATIVE.value]
    lines += ["", f"Native in the installed Unsloth: {', '.join(native) or 'none'}."]
    if not written and not without_diff and not unjudged:
        lines += ["", "Every probe says native: the shim can be retired."]
    return "\n".join(lines) + "\n"
