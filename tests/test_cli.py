from __future__ import annotations

import json

from .conftest import HIDE_UNSLOTH, PATCH_SLOTS, REPO, requires_unsloth, run_python


def _cli(*args: str, prelude: str = "", env: dict[str, str] | None = None):
    code = prelude + "\nimport sys\nfrom unsloth_qwen_compat.cli import main\nsys.exit(main(sys.argv[1:]))"
    return run_python("", args=["-c", code, *args], env=env)


@requires_unsloth
def test_status_prints_every_slot_and_a_verdict() -> None:
    done = run_python("", args=["-m", "unsloth_qwen_compat", "status"])
    assert done.returncode == 0, done.stderr[-2000:]
    for slot in PATCH_SLOTS:
        assert slot in done.stdout
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("verdict: ")
    assert "unsloth" in done.stdout and "transformers" in done.stdout


@requires_unsloth
def test_status_json_holds_only_json_on_stdout() -> None:
    done = run_python("", args=["-m", "unsloth_qwen_compat", "status", "--json"])
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)  # the whole of stdout must parse
    assert {p["name"] for p in report["patches"]} == set(PATCH_SLOTS)
    assert all(p["verdict"] in ("needed", "native", "unsupported", "disabled") for p in report["patches"])
    assert report["verdict"]


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


@requires_unsloth
def test_upstream_report_has_a_section_per_needed_patch_with_measured_numbers(tmp_path) -> None:
    case = "test_rope_past_original_window[qwen3-yarn-msl1024]"
    stock = _report(tmp_path / "stock.json", {case: ("fail", 0.852)})
    shim = _report(tmp_path / "shim.json", {case: ("pass", 1.5e-06)})
    done = run_python(
        "", args=["-m", "unsloth_qwen_compat", "upstream-report", "--stock", stock, "--shim", shim]
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    needed = json.loads(run_python("", args=["-m", "unsloth_qwen_compat", "status", "--json"]).stdout)
    for patch in needed["patches"]:
        assert (f"(`{patch['name']}`)" in out) is (patch["verdict"] == "needed")
    if "(`rope_scaling`)" in out:
        assert f"| `{case}` | fail: rel 0.852 (bound 0.0001) | pass: rel 1.5e-06 (bound 0.0001) |" in out
        assert "FastLanguageModel.from_pretrained" in out  # the reproduction


def test_upstream_report_without_unsloth_says_nothing_to_report() -> None:
    done = _cli("upstream-report", prelude=HIDE_UNSLOTH)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("Nothing to report")
