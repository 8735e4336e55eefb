"""``python -m conformance.rope_table [REPORTS_DIR] [--readme README.md] [--record CONFORMANCE.md]``.

Reads the committed raw reports ``REPORTS_DIR/<leg>/{shim,stock}.json`` (default
``conformance-reports``), takes the RoPE-grid cells (``test_rope_grid[<family>-<type>-<window>-<n>]``)
and prints, per RoPE type and leg, what each window ended in with the shim, and how many
cells stock Unsloth got wrong. With ``--readme`` the table replaces the block between the
``rope-grid`` markers of that file; with ``--record`` every case of every run (and the
mutation runs) replaces the ``rope-grid-runs`` block of CONFORMANCE.md.

A cell's outcome comes from its record: ``right`` (passed against the checkpoint's own
config), ``extended`` (passed against the config the model exposes), ``refused``, or
``WRONG`` (failed or errored).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

#: A grid case id; pytest-xdist's loadgroup appends "@<group>".
CELL = re.compile(
    r"test_rope_grid\[(?P<family>[a-z0-9_]+)-(?P<type>[a-z0-9_]+)-(?P<window>[a-z_]+)-(?P<n>\d+)\](@\S+)?"
)
WINDOWS = {"inside": "inside M", "past_max_positions": "past M", "past_coverage": "past coverage"}
START, END = "<!-- rope-grid:", "<!-- /rope-grid -->"
CONTROLS = ("llama", "mistral")


def outcome(case: dict, family: str) -> str:
    result = case["result"]
    if result == "refused":
        return "refused"
    if result == "pass":
        if family in CONTROLS:  # the shim's run equalled stock Unsloth's (logits, or its error)
            return "= stock"
        labels = {m["metric"] for m in case["metrics"]}
        return "extended" if "logits_rel_vs_exposed" in labels else "right"
    if result == "skip":
        return "skipped"
    return "WRONG"


def read(reports: Path) -> dict:
    """{leg: {mode: {(family, type, window): outcome}}} plus each report's header."""
    legs: dict = {}
    for path in sorted(reports.glob("*/*.json")):
        if path.stem not in ("shim", "stock"):
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        cells = {}
        for case in data["cases"]:
            match = CELL.fullmatch(case["case"])
            if match:
                cells[(match["family"], match["type"], match["window"])] = outcome(case, match["family"])
        if cells:
            legs.setdefault(path.parent.name, {})[path.stem] = {"cells": cells, "header": data}
    return legs


def _leg_key(leg: str):
    return [-int(part) if part.isdigit() else 0 for part in re.split(r"[.-]", leg)]


def table(legs: dict) -> list[str]:
    names = sorted(legs, key=_leg_key)
    types: set[str] = set()
    for leg in names:
        for mode in legs[leg].values():
            types |= {t for (f, t, w) in mode["cells"] if f not in CONTROLS}
    header = "| RoPE type | " + " | ".join(
        f"{leg} (Unsloth {legs[leg].get('shim', legs[leg].get('stock'))['header']['versions']['unsloth']}, "
        f"transformers {legs[leg].get('shim', legs[leg].get('stock'))['header']['versions']['transformers']}, "
        f"{legs[leg].get('shim', legs[leg].get('stock'))['header']['dtype']})"
        for leg in names
    )
    lines = [header + " |", "|---|" + "---|" * len(names)]
    for kind in sorted(types, key=lambda t: (t != "default", t)):
        row = [f"`{kind}`" if kind != "default" else "plain"]
        for leg in names:
            row.append(_cell_text(legs[leg], kind))
        lines.append("| " + " | ".join(row) + " |")
    controls = []
    for leg in names:
        shim = legs[leg].get("shim", {"cells": {}})["cells"]
        parts = []
        for family in CONTROLS:
            ctrl = [v for (f, _, _), v in shim.items() if f == family]
            same = sum(v == "= stock" for v in ctrl)
            parts.append(f"{family} {same}/{len(ctrl)}" if ctrl else f"{family} not run")
        controls.append(f"{leg}: {', '.join(parts)}")
    out = lines
    if controls:
        out += [
            "",
            "Non-Qwen controls, cells whose shim run equals stock Unsloth's bit for bit: "
            + "; ".join(controls)
            + ".",
        ]
    return out


def _cell_text(leg: dict, kind: str) -> str:
    parts = []
    shim = leg.get("shim", {"cells": {}})["cells"]
    by_window: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for (family, k, window), value in sorted(shim.items()):
        if k == kind and family not in CONTROLS:
            by_window[window][value].append(family)
    for window, label in WINDOWS.items():
        families = by_window.get(window)
        if not families:
            continue
        if len(families) == 1:
            text = next(iter(families))
        else:  # name the families where they differ
            text = ", ".join(f"{value} ({' '.join(names)})" for value, names in sorted(families.items()))
        if "WRONG" in families:
            text = f"**{text}**"
        parts.append(f"{label}: {text}")
    stock = [
        v
        for (f, k, _), v in leg.get("stock", {"cells": {}})["cells"].items()
        if k == kind and f not in CONTROLS
    ]
    if stock:
        wrong = sum(v == "WRONG" for v in stock)
        parts.append(f"(stock: {wrong} of {len(stock)} wrong)")
    return "; ".join(parts) if parts else "-"


RUNS_START, RUNS_END = "<!-- rope-grid-runs:", "<!-- /rope-grid-runs -->"


def _measured(case: dict) -> str:
    parts = [
        f"{m['metric']} {m['value']:.3g}" + (f" (<= {m['bound']:.3g})" if m.get("bound") is not None else "")
        for m in case["metrics"]
    ]
    if not parts and case["reason"]:
        parts = [case["reason"].replace("|", "/").splitlines()[0][:160]]
    return ", ".join(parts)


def record(reports: Path) -> list[str]:
    """CONFORMANCE.md's record of the RoPE runs: per leg its header, every case with the shim
    and with stock Unsloth, and the mutation runs (each case that must fail, and did)."""
    out = []
    for leg in sorted({p.parent.name for p in reports.glob("*/*.json")}, key=_leg_key):
        runs = {
            p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted((reports / leg).glob("*.json"))
        }
        for mode in ("shim", "stock"):
            data = runs.get(mode)
            if data is None:
                continue
            env = data["versions"]
            counts = ", ".join(f"{k} {v}" for k, v in sorted(data["counts"].items()))
            # Paths (the suite, the report folder) say nothing about what was selected.
            args = [a for a in data.get("pytest_args", []) if not a.startswith("/")]
            selection = " ".join(a for a in args if a != "--conformance-report")
            out += [
                f"- leg {leg}, {mode}: {data['date'][:10]}, {env['gpu']}, {data['dtype']}, unsloth {env['unsloth']}, "
                f"transformers {env['transformers']}, torch {env['torch']}; `{selection}`: {counts}"
            ]
        shim = {c["case"].split("@")[0]: c for c in runs.get("shim", {}).get("cases", [])}
        stock = {c["case"].split("@")[0]: c for c in runs.get("stock", {}).get("cases", [])}
        out += ["", f"| {leg}: case | shim | measured | stock | measured |", "|---|---|---|---|---|"]
        for name in sorted(set(shim) | set(stock)):
            a, b = shim.get(name), stock.get(name)
            out.append(
                f"| `{name}` | {a['result'] if a else '-'} | {_measured(a) if a else ''} | "
                f"{b['result'] if b else '-'} | {_measured(b) if b else ''} |"
            )
        mutations = {k: v for k, v in runs.items() if k.startswith("mutation-")}
        if mutations:
            out += ["", f"| {leg}: mutation | cases | failed (must fail) |", "|---|---|---|"]
            for name, data in sorted(mutations.items()):
                failed = [c["case"].split("@")[0] for c in data["cases"] if c["result"] in ("fail", "error")]
                out.append(
                    f"| `{name.removeprefix('mutation-')}` | {len(data['cases'])} | {', '.join(failed) or 'NONE'} |"
                )
        out.append("")
    return out


def replace_block(path: Path, lines: list[str], start_marker: str = START, end_marker: str = END) -> None:
    text = path.read_text(encoding="utf-8")
    start = text.index(start_marker)
    start = text.index("\n", start) + 1
    end = text.index(end_marker)
    path.write_text(text[:start] + "\n".join(lines) + "\n" + text[end:], encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m conformance.rope_table", description=__doc__.splitlines()[0]
    )
    parser.add_argument("reports", nargs="?", default="conformance-reports")
    parser.add_argument("--readme", help="rewrite the rope-grid block of this file")
    parser.add_argument("--record", help="rewrite the rope-grid-runs block of this file (CONFORMANCE.md)")
    args = parser.parse_args(argv)
    legs = read(Path(args.reports))
    if not legs:
        print(f"no RoPE-grid cells in {args.reports}/<leg>/{{shim,stock}}.json", file=sys.stderr)
        return 1
    lines = table(legs)
    if args.readme:
        replace_block(Path(args.readme), lines)
    if args.record:
        replace_block(Path(args.record), record(Path(args.reports)), RUNS_START, RUNS_END)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
