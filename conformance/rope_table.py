"""``python -m conformance.rope_table [REPORTS_DIR] [--readme README.md]``.

Reads the committed raw reports ``REPORTS_DIR/<leg>/{shim,stock}.json`` (default
``conformance-reports``, read by raw_reports.py), takes the RoPE-grid cells
(``test_rope_grid[<family>-<type>-<window>-<n>]``) and prints, per RoPE type and leg, what
each window ended in with the shim, and how many cells stock Unsloth got wrong. With
``--readme`` the table replaces the block between the ``rope-grid`` markers of that file;
CONFORMANCE.md (conformance/document.py) shows the same table, and every case of every run.

A cell's outcome comes from its record: ``right`` (passed against the checkpoint's own
config), ``extended`` (passed against the config the model exposes), ``refused``, or
``WRONG`` (failed or errored).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

from conformance import raw_reports

#: A grid case id; the Unsloth entry point ends it (runs since the FastModel entry point was
#: added), pytest-xdist's loadgroup appends "@<group>".
CELL = re.compile(
    r"test_rope_grid\[(?P<family>[a-z0-9_]+)-(?P<type>[a-z0-9_]+)-(?P<window>[a-z_]+)-(?P<n>\d+)"
    r"(-(?P<entry>Fast[A-Za-z]+))?\](@\S+)?"
)
#: The entry point a grid id without one was run through.
DEFAULT_ENTRY = "FastLanguageModel"
WINDOWS = {"inside": "inside M", "past_max_positions": "past M", "past_coverage": "past coverage"}
START, END = "<!-- rope-grid:", "<!-- /rope-grid -->"
#: What the table's words mean (CONFORMANCE.md prints it above the table).
LEGEND = (
    "Per RoPE type and leg, what each window ended in with the shim: *right* (matches "
    "transformers on the checkpoint's config), *extended* (matches transformers given the config "
    'the model exposes), *refused*, or **WRONG**; where families differ they are named. "stock" '
    "counts the cells stock Unsloth got wrong. A leg run only without the shim (`2026.10-upstream`: "
    "Unsloth with the upstream patch series, `conformance/build_patched_unsloth.sh`) shows what Unsloth "
    "did alone. The README shows the same table."
)
CONTROLS = ("llama", "mistral")


def outcome(case: dict, family: str) -> str:
    result = case["result"]
    if result == "refused":
        return "refused"
    if result == "pass":
        labels = {m["metric"] for m in case["metrics"]}
        # A shim run's control: it equalled stock Unsloth's (logits, or its error). A run without
        # the shim holds controls to the contract like any cell.
        if family in CONTROLS and ("control_shim_vs_stock_max_abs" in labels or not labels):
            return "= stock"
        return "extended" if "logits_rel_vs_exposed" in labels else "right"
    if result == "skip":
        return "skipped"
    return "WRONG"


def read(reports: Path) -> dict:
    """{leg: {mode: {"cells": {(family, type, window): outcome}, "header": report}}}, shim and
    stock runs with grid cells (the first of each mode where a leg has several dtypes)."""
    legs: dict = {}
    for leg, runs in raw_reports.read(reports).items():
        for run in runs:
            if run.kind == "mutation" or run.kind in legs.get(leg, {}):
                continue
            cells = {}
            for case in run.cases:
                match = CELL.fullmatch(case["case"])
                if match:
                    # Cells of another entry point count as a family of their own ("qwen3/FastModel").
                    entry = match["entry"] or DEFAULT_ENTRY
                    family = match["family"] if entry == DEFAULT_ENTRY else f"{match['family']}/{entry}"
                    cells[(family, match["type"], match["window"])] = outcome(case, match["family"])
            if cells:
                legs.setdefault(leg, {})[run.kind] = {"cells": cells, "header": run.data}
    return legs


def _control(family: str) -> bool:
    return family.split("/")[0] in CONTROLS


def table(legs: dict) -> list[str]:
    names = sorted(legs, key=raw_reports.leg_key)
    types: set[str] = set()
    for leg in names:
        for mode in legs[leg].values():
            types |= {t for (f, t, w) in mode["cells"] if not _control(f)}
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
    controls, alone = [], []
    for leg in names:
        if "shim" not in legs[leg]:  # Unsloth alone (e.g. with the upstream series): by the contract
            cells = legs[leg]["stock"]["cells"]
            parts = []
            for family in sorted({f for (f, _, _) in cells if _control(f)}):
                ctrl = [v for (f, _, _), v in cells.items() if f == family]
                held = sum(v in ("right", "extended", "refused") for v in ctrl)
                parts.append(f"{family} {held}/{len(ctrl)}")
            alone.append(f"{leg}: {', '.join(parts) or 'not run'}")
            continue
        shim = legs[leg]["shim"]["cells"]
        parts = []
        for family in sorted({f for (f, _, _) in shim if _control(f)} | set(CONTROLS)):
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
    if alone:
        out += [
            "",
            "Legs run without the shim (Unsloth alone), non-Qwen control cells right, extended or "
            "refused as the contract allows: " + "; ".join(alone) + ".",
        ]
    return out


def _cell_text(leg: dict, kind: str) -> str:
    parts = []
    # A leg run only without the shim (Unsloth with the upstream series) shows what Unsloth did alone.
    shim = (leg.get("shim") or leg.get("stock") or {"cells": {}})["cells"]
    by_window: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for (family, k, window), value in sorted(shim.items()):
        if k == kind and not _control(family):
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
        if k == kind and not _control(f)
    ]
    if stock and "shim" in leg:
        wrong = sum(v == "WRONG" for v in stock)
        parts.append(f"(stock: {wrong} of {len(stock)} wrong)")
    return "; ".join(parts) if parts else "-"


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
    args = parser.parse_args(argv)
    legs = read(Path(args.reports))
    if not legs:
        print(f"no RoPE-grid cells in {args.reports}/<leg>/{{shim,stock}}.json", file=sys.stderr)
        return 1
    lines = table(legs)
    if args.readme:
        replace_block(Path(args.readme), lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
