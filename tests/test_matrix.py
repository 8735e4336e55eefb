"""tox.ini, the README, the tested matrix and the committed raw reports say the same thing."""

from __future__ import annotations

import ast
import configparser
import json
import re

from unsloth_qwen_compat import _legs_table
from unsloth_qwen_compat._matrix import LEGS

from .conftest import REPO


def _tox() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "tox.ini")
    return parser


def test_every_leg_has_a_tox_env_with_its_pins() -> None:
    tox = _tox()
    section = next(s for s in tox.sections() if s.startswith("testenv:gpu-"))
    envs = set(re.search(r"\{(.*)\}", section).group(1).split(","))
    assert envs == {leg.name for leg in LEGS}
    deps = tox[section]["deps"]
    for leg in LEGS:
        for pin in leg.pins():
            assert f"{leg.name}: {pin}" in deps, f"tox.ini lacks {leg.name}: {pin}"


def test_readme_table_is_generated_from_the_matrix_and_the_reports() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    start, end = _legs_table.block_span(readme)
    table = _legs_table.markdown_table(REPO / _legs_table.REPORTS_DIR)
    assert readme[start:end] == table + "\n", (
        "regenerate: python -m unsloth_qwen_compat._legs_table --readme README.md"
    )


def test_each_legs_reports_were_measured_on_its_pins() -> None:
    for leg in LEGS:
        for report in _legs_table.read_reports(REPO / _legs_table.REPORTS_DIR, leg.name).values():
            assert report["versions"]["unsloth"] == leg.unsloth, leg.name
            assert report["versions"]["transformers"] == leg.transformers, leg.name


def _report(tmp_path, leg: str, run: str, **fields) -> None:
    report = {
        "date": "2026-12-02T08:32:04+00:00",
        "dtype": "fp32",
        "pytest_args": ["/repo/conformance", "-p", "no:cacheprovider", "-m", "rope", "-n", "3"],
        "versions": {"gpu": "NVIDIA H200", "unsloth": "2026.10.9"},
        "counts": {"pass": 87, "refused": 4},
        "cases": [],
    } | fields
    (tmp_path / leg).mkdir(exist_ok=True)
    (tmp_path / leg / f"{run}.json").write_text(json.dumps(report), encoding="utf-8")


def test_the_conformance_cell_says_what_the_reports_say(tmp_path) -> None:
    _report(tmp_path, "a", "shim")
    _report(tmp_path, "a", "stock", counts={"fail": 26, "pass": 65})
    _report(tmp_path, "a", "mutation-rope-base-1pct", counts={"fail": 91})  # not a leg's run
    assert _legs_table.conformance_cell(_legs_table.read_reports(tmp_path, "a")) == (
        "`-m rope`: shim 87 pass, 4 refused, 0 fail vs stock 65 pass, 26 fail (NVIDIA H200, fp32, 2026-12-02)"
    )
    # What differs between the two runs is said per run.
    _report(tmp_path, "b", "shim", pytest_args=["-k", "test_rope_grid", "conformance/test_rope.py::x"])
    _report(tmp_path, "b", "stock", dtype="bf16", counts={"error": 1}, pytest_args=["-k", "test_rope_grid"])
    assert _legs_table.conformance_cell(_legs_table.read_reports(tmp_path, "b")) == (
        "shim (`-k test_rope_grid` `test_rope.py::x`) 87 pass, 4 refused, 0 fail (NVIDIA H200, fp32, 2026-12-02)"
        " vs stock (`-k test_rope_grid`) 0 fail, 1 error (NVIDIA H200, bf16, 2026-12-02)"
    )
    assert _legs_table.conformance_cell({}) == "no raw report committed"
    # A stopped run says how much did not end: by name where its report can, else as it stopped.
    stopped = {"nodeid": "conformance/x.py::test_y[qwen3]", "result": None}
    _report(tmp_path, "c", "shim", interrupted=True, collected=92, cases=[stopped], not_started=["n1"])
    _report(tmp_path, "c", "stock", interrupted=True, counts={"pass": 65})
    assert _legs_table.conformance_cell(_legs_table.read_reports(tmp_path, "c")) == (
        "`-m rope`: shim 87 pass, 4 refused, 0 fail, 2 not ended vs stock 65 pass, 0 fail;"
        " interrupted after 0 cases (NVIDIA H200, fp32, 2026-12-02)"
    )


def test_runtime_code_never_reads_the_reports() -> None:
    # A wheel carries no conformance-reports/: only the README's generator and upstream-patch
    # read them, and no module of the package imports the generator.
    package = REPO / "unsloth_qwen_compat"
    importers, naming_reports = [], []
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (
                "_legs_table" in (node.module or "") or any(a.name == "_legs_table" for a in node.names)
            ):
                importers.append(path.name)
            elif isinstance(node, ast.Constant) and _legs_table.REPORTS_DIR in str(node.value):
                naming_reports.append(path.name)
    assert importers == []
    # upstream-patch's PR descriptions quote them (a command, run from a checkout; it says so
    # where there are none).
    assert set(naming_reports) == {"_legs_table.py", "upstream_patch.py"}


def test_cpu_env_pins_the_cpu_torch_and_drops_torchvision() -> None:
    tox = _tox()
    assert "torch==2.13.0" in tox["testenv:cpu"]["deps"]
    assert "uninstall -y -q torchvision" in tox["testenv:cpu"]["commands_pre"]
