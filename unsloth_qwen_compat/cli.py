"""``python -m unsloth_qwen_compat status | doctor | upstream-report | upstream-patch | bench | conformance`` (also the ``unsloth-qwen-compat`` script).

The arguments are parsed before anything imports Unsloth (the package defers its
import-time work when it is this command line: see ``_started_as_own_command_line``), so
``--help``, ``--version`` and usage errors answer at once. Unsloth writes
``unsloth_compiled_cache/`` into the working directory when it is imported; the command
line imports it, here and in its inspecting child, from a scratch directory instead of
the caller's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import bench, conformance_command
from ._env import MODE_CPU_FALLBACK, TRACKED_DISTRIBUTIONS
from ._matrix import LEGS, MOVING_LEG_RECIPE
from ._registry import Action
from ._version import __version__

#: The program name of the ``unsloth-qwen-compat`` script; ``__main__`` passes its own.
PROG = "unsloth-qwen-compat"

INSPECTED_NOTE = (
    "no GPU: this process runs Unsloth's CPU fallback (stock transformers code) and patches "
    "nothing; the verdicts come from a child process with UNSLOTH_ALLOW_CPU=1 that inspected "
    f"Unsloth's GPU code, and '{Action.WOULD_APPLY.value}' marks what a GPU run of this install applies"
)


@contextlib.contextmanager
def _scratch_directory() -> Iterator[str]:
    """A temporary working directory, so that Unsloth's compile cache does not land in the caller's."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="unsloth-qwen-compat-", ignore_cleanup_errors=True) as scratch:
        os.chdir(scratch)
        try:
            yield scratch
        finally:
            os.chdir(here)


def _load_shim() -> None:
    """The package's import-time work (import Unsloth, probe, patch), if not done yet."""
    from . import _current

    with _scratch_directory():
        _current()


def _inspect_gpu_code_in_child() -> dict[str, Any] | None:
    """Status from a child with UNSLOTH_ALLOW_CPU=1, where Unsloth's GPU code is imported.

    Without a GPU, Unsloth falls back to stock transformers code and there is nothing to
    patch; the child shows what the same install would need on a GPU. It runs in a scratch
    directory and imports this very copy of the package.
    """
    child_env = dict(os.environ, UNSLOTH_ALLOW_CPU="1")
    root = str(Path(__file__).resolve().parent.parent)
    code = (
        f"import sys; root = {root!r}\n"
        "if root not in sys.path: sys.path.insert(0, root)\n"
        "import json, unsloth_qwen_compat as m; print(json.dumps(m.status()))"
    )
    try:
        with _scratch_directory() as scratch:
            done = subprocess.run(
                [sys.executable, "-c", code],
                env=child_env,
                cwd=scratch,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 or not done.stdout.strip():
        return None
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except json.JSONDecodeError:
        return None


def _as_inspected(here: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """This process's report (environment, mode, timings) with the inspecting child's verdicts.

    This process patched nothing, so what the child applied is reported as ``would apply``.
    """
    patches = []
    for entry in child["patches"]:
        if entry["action"] == Action.APPLIED.value:
            entry = entry | {
                "action": Action.WOULD_APPLY.value,
                "detail": f"on a GPU: {entry['detail']}",
            }
        patches.append(entry)
    return here | {
        "tested_leg": child["tested_leg"],
        "patches": patches,
        "verdict": child["verdict"],
        "notes": [INSPECTED_NOTE, *child["notes"]],
        "inspected_in_child": True,
    }


def collect_status(inspect: bool) -> dict[str, Any]:
    """The report ``status``, ``doctor`` and ``upstream-report`` print (``--json``: as is).

    Without a GPU (Unsloth's CPU fallback) and with ``inspect``, the verdicts are those of
    a child that inspected Unsloth's GPU code; the mode stays this process's.
    """
    import unsloth_qwen_compat

    report = unsloth_qwen_compat.status() | {"inspected_in_child": False}
    if inspect and report["environment"]["unsloth_mode"] == MODE_CPU_FALLBACK:
        child = _inspect_gpu_code_in_child()
        if child is not None:
            return _as_inspected(report, child)
    return report


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def render_status(report: dict[str, Any]) -> str:
    env = report["environment"]
    gpu = env["gpu"]
    gpu_text = (
        "none"
        if gpu is None
        else f"{gpu['count']} x {gpu['name']} (sm_{gpu['capability']}, CUDA {gpu['cuda']})"
    )
    versions = [[name, env["versions"].get(name) or "not installed"] for name in TRACKED_DISTRIBUTIONS]
    out = [
        f"unsloth-qwen-compat {report['unsloth_qwen_compat']}",
        f"python   {env['python']}",
        f"gpu      {gpu_text}",
        "unsloth  mode: "
        + (
            "cpu-fallback here; verdicts from its GPU code, inspected with UNSLOTH_ALLOW_CPU=1"
            if report.get("inspected_in_child")
            else env["unsloth_mode"] + (f" ({env['unsloth_error']})" if env["unsloth_error"] else "")
        ),
        f"leg      {report['tested_leg'] or 'outside the tested matrix'}",
        "",
        _table(versions, ["package", "version"]),
        "",
        _table(
            [[p["name"], p["verdict"], p["action"], p["reason"]] for p in report["patches"]],
            ["patch", "verdict", "action", "reason"],
        ),
        "",
    ]
    out += [f"note: {note}" for note in report["notes"]]
    out.append(f"verdict: {report['verdict']}")
    return "\n".join(out)


def render_doctor(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [render_status(report), "", "Tested matrix (tox -e gpu-<leg>):"]
    rows = [
        [
            leg.name,
            leg.unsloth,
            leg.unsloth_zoo,
            leg.transformers,
            leg.trl,
            leg.peft,
            leg.conformance or "not yet run",
        ]
        for leg in LEGS
    ]
    lines.append(
        _table(rows, ["leg", "unsloth", "unsloth_zoo", "transformers", "trl", "peft", "conformance"])
    )
    for leg in LEGS:
        if leg.moving:
            lines.append(
                f"Leg {leg.name} follows the newest transformers / trl / peft releases with unsloth "
                f"{leg.unsloth} (installed past Unsloth's declared caps), so that drift shows the day it "
                "lands. To move it:"
            )
            lines += [f"  {n}. {step.format(leg=leg.name)}" for n, step in enumerate(MOVING_LEG_RECIPE, 1)]
    lines.append("")
    advice = []
    installed = env["versions"]
    if installed.get("unsloth") is None:
        advice.append("Unsloth is not installed: the HF path works; for Unsloth, pin one leg above.")
    elif report["tested_leg"] is None:
        closest = next((leg for leg in LEGS if leg.unsloth == installed.get("unsloth")), None)
        if closest is not None:
            advice.append(
                f"unsloth {closest.unsloth} was tested with transformers {closest.transformers}, "
                f"trl {closest.trl}, peft {closest.peft}: pin those "
                f"(pip install {' '.join(closest.pins())})."
            )
        else:
            advice.append(
                f"unsloth {installed.get('unsloth')} is not in the tested matrix: pin one leg above "
                f"(e.g. pip install {' '.join(LEGS[0].pins())}), or run the conformance suite on "
                "this pair before training."
            )
    else:
        leg = next(leg for leg in LEGS if leg.name == report["tested_leg"])
        for name, pin in (("trl", leg.trl), ("peft", leg.peft), ("unsloth_zoo", leg.unsloth_zoo)):
            if installed.get(name) != pin:
                advice.append(
                    f"{name} {installed.get(name)} differs from the tested {pin}: pip install {name}=={pin}"
                )
        if not leg.conformance:
            advice.append(f"leg {leg.name} has no recorded conformance run yet: run tox -e gpu-{leg.name}.")
    if env["unsloth_mode"] in ("cpu-fallback", "cpu-allowed"):
        advice.append("No CUDA GPU: Unsloth cannot train here; use the HF path (model.use_unsloth: false).")
    if env["transformers_imported_first"]:
        advice.append("Import unsloth_qwen_compat before transformers, trl and peft.")
    lines += ["advice:"] + [f"  - {a}" for a in advice or ["nothing to change."]]
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="What the installed Unsloth needs for Qwen, and what the shim did about it.",
    )
    parser.add_argument("--version", action="version", version=f"unsloth-qwen-compat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("status", "versions, GPU, every patch with its verdict, and the one-line verdict"),
        ("doctor", "status plus the tested pins and what to change"),
    ):
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--json", action="store_true", help="machine-readable output only on stdout")
        command.add_argument(
            "--no-inspect",
            action="store_true",
            help="without a GPU, do not inspect Unsloth's GPU code in a child process",
        )
    upstream = sub.add_parser(
        "upstream-report", help="markdown for upstream issues, one section per needed patch"
    )
    upstream.add_argument(
        "--stock",
        type=Path,
        help="conformance.json of a run with UNSLOTH_QWEN_COMPAT_DISABLE=1 (stock Unsloth)",
    )
    upstream.add_argument(
        "--shim", type=Path, help="conformance.json of a run with the shim, in another report directory"
    )
    upstream.add_argument("--no-inspect", action="store_true", help=argparse.SUPPRESS)
    upstream_patch = sub.add_parser(
        "upstream-patch",
        help="each needed fix as a diff against the installed Unsloth's source, with tests and a PR description",
    )
    upstream_patch.add_argument("--out", type=Path, required=True, help="folder to write the series into")
    upstream_patch.add_argument(
        "--reports",
        type=Path,
        help="the committed raw conformance reports (<leg>/{stock,shim}.json, <leg>-upstream/stock.json); "
        "default: those of the checkout this package runs from",
    )
    upstream_patch.add_argument("--no-inspect", action="store_true", help=argparse.SUPPRESS)
    bench.add_arguments(
        sub.add_parser("bench", help="training throughput, peak memory and MFU: HF vs Unsloth vs the shim")
    )
    conformance_command.add_arguments(
        sub.add_parser(
            "conformance",
            help="run the GPU conformance suite against the installed Unsloth, with a report",
            description=conformance_command.DESCRIPTION,
            # pytest's own options must not pass for abbreviations of --report.
            allow_abbrev=False,
        )
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if args.command == "conformance":
        # Everything but --report is pytest's; the suite imports the shim and Unsloth itself.
        return conformance_command.run(args.report, unknown)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    _load_shim()
    if args.command == "bench":
        return bench.run(args, bench.command_line(argv[1:]))
    report = collect_status(inspect=not args.no_inspect)
    if args.command == "upstream-patch":
        from . import upstream_patch
        from .patches import all_patches

        patches = {patch.name: patch for patch in all_patches()}
        try:
            written = upstream_patch.write(args.out, report, patches, args.reports)
        except upstream_patch.SeriesError as error:
            print(f"upstream-patch: {error}", file=sys.stderr)
            return 2
        print((args.out / "README.md").read_text(encoding="utf-8"), end="")
        print(f"\nwrote {len(written)} patch(es) to {args.out}")
        return 0
    if args.command == "upstream-report":
        from . import upstream
        from .patches import all_patches

        patches = {patch.name: patch for patch in all_patches()}
        print(upstream.render(report, patches, args.stock, args.shim))
        return 0
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.command == "status":
        print(render_status(report))
    else:
        print(render_doctor(report))
    return 0
