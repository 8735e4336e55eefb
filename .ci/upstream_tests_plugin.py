"""pytest plugin for .ci/upstream_tests.py (loaded with ``-p upstream_tests_plugin``).

It imports ``unsloth`` / ``unsloth_qwen_compat`` in the order named by
``UPSTREAM_TESTS_IMPORT_ORDER`` (comma-separated, e.g. ``unsloth_qwen_compat,unsloth``)
when pytest loads it, i.e. before any conftest or test module is imported, and writes
every test's outcome (and the shim's ledger) as JSON to ``UPSTREAM_TESTS_RESULTS``.
No conftest is involved: upstream's test tree stays byte-identical to the pinned files.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import traceback

_ORDER = [name for name in os.environ.get("UPSTREAM_TESTS_IMPORT_ORDER", "").split(",") if name]
_RESULTS = os.environ.get("UPSTREAM_TESTS_RESULTS", "")

_imported: list[str] = []
_import_error = ""
for _name in _ORDER:
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Unsloth's banners
            importlib.import_module(_name)
        _imported.append(_name)
    except Exception:  # reported in the results; every test then shows the same break
        _import_error = f"import {_name}: " + traceback.format_exc(limit=3)
        break

_outcomes: dict[str, dict[str, str]] = {}


def _short(report) -> str:
    """One line saying why a test did not pass (the exception line, or the skip reason)."""
    longrepr = report.longrepr
    if longrepr is None:
        return ""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # skip: (path, line, reason)
        return str(longrepr[2])
    crash = getattr(getattr(longrepr, "reprcrash", None), "message", None)
    text = crash if crash else str(longrepr)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def _record(nodeid: str, outcome: str, message: str) -> None:
    previous = _outcomes.get(nodeid)
    # A failing setup or teardown makes the test an error, whatever its call did.
    if previous is not None and previous["outcome"] in ("failed", "error"):
        return
    _outcomes[nodeid] = {"outcome": outcome, "message": message}


def pytest_runtest_logreport(report) -> None:
    if report.when == "call":
        if hasattr(report, "wasxfail"):
            outcome = "xpassed" if report.passed else "xfailed"
        else:
            outcome = report.outcome
        _record(report.nodeid, outcome, _short(report) if outcome != "passed" else "")
    elif report.failed:  # setup or teardown
        _record(report.nodeid, "error", f"{report.when}: {_short(report)}")
    elif report.skipped and report.when == "setup":
        outcome = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        _record(report.nodeid, outcome, _short(report))


def pytest_collectreport(report) -> None:
    if report.failed:  # a test file that cannot be imported
        _record(report.nodeid, "error", f"collection: {_short(report)}")


def _shim_ledger() -> list[dict[str, str]]:
    module = sys.modules.get("unsloth_qwen_compat")
    if module is None:
        return []
    try:
        return [
            {key: str(entry.get(key)) for key in ("name", "verdict", "action")}
            for entry in module.status()["patches"]
        ]
    except Exception as exc:
        return [{"name": "?", "verdict": "?", "action": f"status() raised {exc!r}"}]


def pytest_sessionfinish(session, exitstatus) -> None:
    if not _RESULTS:
        return
    unsloth = sys.modules.get("unsloth")
    payload = {
        "import_order": _ORDER,
        "imported": _imported,
        "import_error": _import_error,
        "unsloth_version": getattr(unsloth, "__version__", None),
        "unsloth_file": getattr(unsloth, "__file__", None),
        "shim": _shim_ledger(),
        "shim_file": getattr(sys.modules.get("unsloth_qwen_compat"), "__file__", None),
        "exitstatus": int(exitstatus),
        "outcomes": _outcomes,
    }
    with open(_RESULTS, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)
