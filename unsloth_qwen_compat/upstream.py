"""``upstream-report``: one markdown section per defect the installed Unsloth still has.

Each section is meant to be pasted into an Unsloth issue or PR: the defect as the probe
found it, a minimal reproduction, the measured error before and after the shim (read from
conformance reports of a stock and a shim run: nothing is made up when they are absent),
and the versions. When upstream fixes a defect, its probe says ``native`` and the section
disappears: this is how the shim works itself out of a job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._registry import Patch, Verdict


def _load(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {}
    report = json.loads(Path(path).read_text())
    return {case["case"]: case for case in report.get("cases", [])}


def _metrics(case: dict[str, Any] | None) -> str:
    if case is None:
        return "not run"
    values = ", ".join(
        f"{m['metric']} {m['value']:.3g}"
        + (f" (bound {m['bound']:.3g})" if m.get("bound") is not None else "")
        for m in case.get("metrics", [])
    )
    return f"{case['result']}: {values}" if values else case["result"]


def _measured(patch: Patch, stock: dict[str, dict], shim: dict[str, dict]) -> list[str]:
    names = sorted(name for name in set(stock) | set(shim) if name.startswith(patch.conformance_cases))
    if not names:
        return [
            "No conformance numbers given: run `UNSLOTH_QWEN_COMPAT_DISABLE=1 python -m conformance "
            "--report stock` and `python -m conformance --report shim`, then pass "
            "`--stock stock/conformance.json --shim shim/conformance.json`."
        ]
    rows = ["| case | stock Unsloth | with the shim's fix |", "|---|---|---|"]
    rows += [f"| `{name}` | {_metrics(stock.get(name))} | {_metrics(shim.get(name))} |" for name in names]
    return rows


def render(status: dict[str, Any], patches: dict[str, Patch], stock: Path | None, shim: Path | None) -> str:
    stock_cases, shim_cases = _load(stock), _load(shim)
    env = status["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    gpu = env["gpu"]["name"] if env["gpu"] else "no GPU (verdicts from inspecting Unsloth's code)"
    sections = []
    for entry in status["patches"]:
        if entry["verdict"] != Verdict.NEEDED.value:
            continue
        patch = patches[entry["name"]]
        lines = [
            f"## {entry['summary']} (`{entry['name']}`)",
            "",
            f"**Defect** (found by probing the installed code): {entry['reason']}.",
            "",
            f"**Versions** (where this report was made): {versions}; {gpu}.",
            "",
        ]
        if patch.reproduction:
            lines += ["**Reproduction**:", "", "```python", patch.reproduction.rstrip(), "```", ""]
        lines += [
            "**Measured** (conformance suite, tiny random models, HF reference in a clean process):",
            "",
        ]
        lines += _measured(patch, stock_cases, shim_cases)
        lines += [
            "",
            "Workaround until fixed: `import unsloth_qwen_compat` before Unsloth "
            f"(the shim's action on this install: {entry['action']}).",
            "",
        ]
        sections.append("\n".join(lines))
    if not sections:
        unjudged = [e["name"] for e in status["patches"] if e["verdict"] != Verdict.NATIVE.value]
        if unjudged:
            return f"Nothing to report: no defect found, but {', '.join(unjudged)} could not be judged here ({status['verdict']}).\n"
        return "Nothing to report: every probe says native. The shim can be retired.\n"
    return "# Defects of the installed Unsloth that unsloth-qwen-compat works around\n\n" + "\n".join(
        sections
    )
