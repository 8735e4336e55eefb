from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest

from unsloth_qwen_compat import __version__, cli, upstream
from unsloth_qwen_compat.patches import all_patches

from .conftest import HIDE_UNSLOTH, PATCH_SLOTS, REPO, run_python

#: The ``unsloth-qwen-compat`` script as pip writes it, so the test needs no install.
CONSOLE_SCRIPT = """import sys
from unsloth_qwen_compat.cli import main
if __name__ == '__main__':
    sys.argv[0] = sys.argv[0].removesuffix('.exe')
    sys.exit(main())
"""


def _cli(*args: str, prelude: str = "", env: dict[str, str] | None = None):
    code = prelude + "\nimport sys\nfrom unsloth_qwen_compat.cli import main\nsys.exit(main(sys.argv[1:]))"
    return run_python("", args=["-c", code, *args], env=env)


def _run_in(cwd: Path, command: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    """``command`` in ``cwd``, with this checkout importable and no UNSLOTH* switches inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNSLOTH")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kwargs)


@pytest.fixture(params=["module", "script"])
def entry(request, tmp_path: Path) -> tuple[list[str], str]:
    """How the command line is started (``python -m`` or the console script) and its usage name."""
    if request.param == "module":
        return [sys.executable, "-m", "unsloth_qwen_compat"], "python -m unsloth_qwen_compat"
    script = tmp_path / "bin" / "unsloth-qwen-compat"
    script.parent.mkdir()
    script.write_text(CONSOLE_SCRIPT)
    return [sys.executable, str(script)], "unsloth-qwen-compat"


HEAVY = ("unsloth", "unsloth_zoo", "torch", "transformers")


@pytest.mark.parametrize(
    ("args", "returncode", "expect"),
    [
        (["--help"], 0, "usage: {prog} [-h] [--version]"),
        (["status", "--help"], 0, "usage: {prog} status [-h] [--json]"),
        (["--version"], 0, f"unsloth-qwen-compat {__version__}"),
        ([], 2, "{prog}: error: the following arguments are required: command"),
        (["stauts"], 2, "{prog}: error: argument command: invalid choice: 'stauts'"),
        (["status", "--jsn"], 2, "{prog}: error: unrecognized arguments: --jsn"),
        (["conformance", "--help"], 0, "usage: {prog} conformance [-h] --report DIR"),
        (
            ["conformance", "-x"],
            2,
            "{prog} conformance: error: the following arguments are required: --report",
        ),
    ],
)
def test_help_version_and_usage_errors_answer_at_once_without_unsloth(
    entry, tmp_path: Path, args: list[str], returncode: int, expect: str
) -> None:
    command, prog = entry
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    started = time.perf_counter()
    done = _run_in(cwd, [*command, *args])
    seconds = time.perf_counter() - started
    assert done.returncode == returncode, done.stderr[-2000:]
    assert expect.format(prog=prog) in done.stdout + done.stderr
    assert seconds < 2.0, f"{args} took {seconds:.2f} s"
    # -X importtime lists every module the process imported, on stderr.
    traced = _run_in(cwd, [command[0], "-X", "importtime", *command[1:], *args])
    imported = {line.rsplit("|", 1)[-1].strip() for line in traced.stderr.splitlines() if "|" in line}
    assert "unsloth_qwen_compat.cli" in imported  # the trace did see the command line
    assert not {name for name in imported if name.split(".")[0] in HEAVY}
    assert list(cwd.iterdir()) == []


@pytest.fixture(scope="module")
def status_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``status`` and ``status --json`` run once, from a working directory of their own."""
    if find_spec("unsloth") is None:
        pytest.skip("Unsloth is not installed")
    cwd = tmp_path_factory.mktemp("cwd")
    command = [sys.executable, "-m", "unsloth_qwen_compat", "status"]
    text, machine = _run_in(cwd, command), _run_in(cwd, [*command, "--json"])
    return {"text": text, "json": machine, "left_in_cwd": sorted(p.name for p in cwd.iterdir())}


def test_status_prints_every_slot_and_a_verdict(status_runs) -> None:
    done = status_runs["text"]
    assert done.returncode == 0, done.stderr[-2000:]
    for slot in PATCH_SLOTS:
        assert slot in done.stdout
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("verdict: ")
    assert "unsloth" in done.stdout and "transformers" in done.stdout


def test_status_json_holds_only_json_on_stdout(status_runs) -> None:
    done = status_runs["json"]
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)  # the whole of stdout must parse
    assert {p["name"] for p in report["patches"]} == set(PATCH_SLOTS)
    assert all(p["verdict"] in ("needed", "native", "unsupported", "disabled") for p in report["patches"])
    assert report["verdict"]


def test_status_leaves_nothing_in_the_working_directory(status_runs) -> None:
    # Importing Unsloth writes unsloth_compiled_cache/ into the working directory.
    assert status_runs["left_in_cwd"] == []


def test_status_text_and_json_say_the_same(status_runs) -> None:
    text, report = status_runs["text"].stdout, json.loads(status_runs["json"].stdout)
    mode = re.search(r"^unsloth  mode: (\S+?)[ ;]", text + " ", re.M)
    assert mode and mode.group(1) == report["environment"]["unsloth_mode"], text
    rows = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line)
        if cells[0] in PATCH_SLOTS:
            rows[cells[0]] = (cells[1], cells[2])
    assert rows == {p["name"]: (p["verdict"], p["action"]) for p in report["patches"]}
    assert f"verdict: {report['verdict']}" in text
    if report["environment"]["unsloth_mode"] == "cpu-fallback":
        # Nothing is patched in Unsloth's CPU fallback: what a GPU run applies is "would apply".
        assert report["inspected_in_child"] is True
        assert "applied" not in {p["action"] for p in report["patches"]}
        assert "would apply" in {p["action"] for p in report["patches"]}


def test_readme_status_sample_is_what_status_prints(status_runs) -> None:
    sample = (REPO / "README.md").read_text().split("above it prints:\n\n```\n", 1)[1].split("```", 1)[0]
    printed = status_runs["text"].stdout
    if sample.split("\n\n", 2)[1] != printed.split("\n\n", 2)[1]:
        pytest.skip("the README's sample is of the CI pins, and other versions are installed here")

    def said(text: str) -> list[list[str]]:
        lines = text.splitlines()
        rows = [re.split(r"\s{2,}", line)[:3] for line in lines if line.split(" ")[0] in PATCH_SLOTS]
        return rows + [
            [line] for line in lines if line.startswith(("gpu ", "unsloth  mode", "note:", "verdict:"))
        ]

    assert said(sample) == said(printed)


def test_an_inspected_report_keeps_this_process_and_says_would_apply() -> None:
    here = {
        "environment": {"unsloth_mode": "cpu-fallback", "gpu": None},
        "tested_leg": "2026.10",
        "patches": [],
        "verdict": "nothing to patch: Unsloth cpu-fallback",
        "notes": [],
        "inspected_in_child": False,
    }
    child = {
        "environment": {"unsloth_mode": "cpu-allowed", "gpu": None},
        "tested_leg": "2026.10",
        "patches": [
            {"name": "a", "verdict": "needed", "action": "applied", "detail": "2 attribute(s) replaced"},
            {"name": "b", "verdict": "needed", "action": "opt-in", "detail": "off by default"},
            {"name": "c", "verdict": "native", "action": "skipped", "detail": ""},
        ],
        "verdict": "shim needed for: a, b",
        "notes": ["from the child"],
    }
    report = cli._as_inspected(here, child)
    assert report["environment"]["unsloth_mode"] == "cpu-fallback"
    assert [(p["name"], p["action"]) for p in report["patches"]] == [
        ("a", "would apply"),
        ("b", "opt-in"),
        ("c", "skipped"),
    ]
    assert report["patches"][0]["detail"] == "on a GPU: 2 attribute(s) replaced"
    assert report["verdict"] == "shim needed for: a, b"
    assert report["notes"] == [cli.INSPECTED_NOTE, "from the child"]
    assert report["inspected_in_child"] is True
    assert child["patches"][0]["action"] == "applied"  # the child's report is left as it was


def test_status_without_unsloth_exits_zero_and_says_missing() -> None:
    done = _cli("status", prelude=HIDE_UNSLOTH)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "unsloth       not installed" in done.stdout
    assert "verdict: nothing to patch: Unsloth missing" in done.stdout


def test_status_json_with_disable_variable() -> None:
    done = _cli(
        "status", "--json", "--no-inspect", prelude=HIDE_UNSLOTH, env={"UNSLOTH_QWEN_COMPAT_DISABLE": "1"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert {p["verdict"] for p in report["patches"]} == {"disabled"}


def test_doctor_lists_the_tested_pins() -> None:
    done = _cli("doctor", prelude=HIDE_UNSLOTH)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Tested matrix" in done.stdout
    assert "2026.10.9" in done.stdout and "5.17.0" in done.stdout
    assert "Unsloth is not installed" in done.stdout
    # The moving leg: its pins and how to move them.
    assert "5.24.0" in done.stdout and "Leg latest follows the newest" in done.stdout
    assert "pip index versions transformers" in done.stdout and "tox -e gpu-latest" in done.stdout


def test_console_script_is_declared() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert 'unsloth-qwen-compat = "unsloth_qwen_compat.cli:main"' in text


def _report(path, results: dict[str, tuple[str, float]]) -> str:
    cases = [
        {"case": name, "result": result, "metrics": [{"metric": "rel", "value": value, "bound": 1e-4}]}
        for name, (result, value) in results.items()
    ]
    path.write_text(json.dumps({"cases": cases}))
    return str(path)


def test_upstream_report_has_a_section_per_needed_patch_with_measured_numbers(tmp_path, status_runs) -> None:
    case = "test_rope_past_original_window[qwen3-yarn-msl1024]"
    stock = _report(tmp_path / "stock.json", {case: ("fail", 0.852)})
    shim = _report(tmp_path / "shim.json", {case: ("pass", 1.5e-06)})
    done = run_python(
        "", args=["-m", "unsloth_qwen_compat", "upstream-report", "--stock", stock, "--shim", shim]
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    needed = json.loads(status_runs["json"].stdout)
    for patch in needed["patches"]:
        assert (f"(`{patch['name']}`)" in out) is (patch["verdict"] == "needed")
    if "(`rope_scaling`)" in out:
        assert f"| `{case}` | fail: rel 0.852 (bound 0.0001) | pass: rel 1.5e-06 (bound 0.0001) |" in out
        assert "FastLanguageModel.from_pretrained" in out  # the reproduction


def test_upstream_report_without_unsloth_says_nothing_to_report() -> None:
    done = _cli("upstream-report", prelude=HIDE_UNSLOTH)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("Nothing to report")


def test_upstream_report_hint_names_two_different_reports() -> None:
    status = {
        "environment": {"versions": {"unsloth": "2026.10.9"}, "gpu": None},
        "patches": [
            {
                "name": "rope_scaling",
                "summary": "RoPE",
                "verdict": "needed",
                "reason": "x",
                "action": "applied",
            }
        ],
        "verdict": "shim needed for: rope_scaling",
    }
    out = upstream.render(status, {p.name: p for p in all_patches()}, None, None)
    stock, shim = re.search(r"--stock (\S+) --shim (\S+)`", out).groups()
    assert stock != shim
    assert f"--report {Path(stock).parent}`" in out and f"--report {Path(shim).parent}`" in out
    assert "(the shim's action on this install: applied)" in out


@pytest.mark.parametrize(
    ("argv", "orig_argv", "own"),
    [
        (["-m", "--help"], ["python", "-m", "unsloth_qwen_compat", "--help"], True),
        (["-m"], ["python", "-X", "importtime", "-Im", "unsloth_qwen_compat"], True),
        (["-m", "status"], ["python", "-munsloth_qwen_compat.__main__", "status"], True),
        (["-m", "unsloth_qwen_compat"], ["python", "-m", "train", "unsloth_qwen_compat"], False),
        (["-m"], ["python", "-m", "unsloth_qwen_compat._bench_worker"], False),
        (["/venv/bin/unsloth-qwen-compat", "status"], None, True),
        (["unsloth-qwen-compat.exe"], None, True),
        (["unsloth-qwen-compat-script.py"], None, True),
        (["train.py", "unsloth-qwen-compat"], None, False),
        (["-c"], None, False),
        ([""], None, False),
    ],
)
def test_only_the_packages_own_command_line_defers_the_import_time_work(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], orig_argv: list[str] | None, own: bool
) -> None:
    import unsloth_qwen_compat

    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "orig_argv", orig_argv or ["python", *argv])
    assert unsloth_qwen_compat._started_as_own_command_line() is own
