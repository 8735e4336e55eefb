"""CONFORMANCE.md is what `python -m conformance.document` makes of conformance-reports/, and
that command says what the reports say (summary, worst errors, mutations, details)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conformance import document, raw_reports

from .conftest import REPO


def test_conformance_md_is_generated_from_the_committed_reports() -> None:
    text, warnings = document.render(REPO / raw_reports.REPORTS_DIR)
    assert warnings == [], "conformance-reports/notes.json holds notes on replaced runs: remove them"
    page = (REPO / "CONFORMANCE.md").read_text(encoding="utf-8")
    assert page == text, "regenerate: python -m conformance.document"
    # Every committed run is on the page, and every mutation was caught somewhere.
    for runs in raw_reports.read(REPO / raw_reports.REPORTS_DIR).values():
        for run in runs:
            assert f"- {run.label}: " in page or f"Mutation `{run.mutation}` ({run.dtype}" in page
    assert "NOT CAUGHT" not in page


def _case(name: str, result: str = "pass", *metrics: dict, reason: str = "") -> dict:
    return {
        "case": name,
        "nodeid": f"conformance/x.py::{name}",
        "result": result,
        "metrics": list(metrics),
        "reason": reason,
        "seconds": 0.1,
    }


def _m(metric: str, value: float, bound: float | None, dtype: str = "bf16", **extra) -> dict:
    return {
        "metric": metric,
        "value": value,
        "bound": bound,
        "dtype": dtype,
        "ok": bound is None or value <= bound,
        **extra,
    }


def _write(
    root: Path,
    leg: str,
    name: str,
    *cases: dict,
    dtype: str = "bf16",
    args=(),
    mutation: str = "",
    date: str = "2026-12-03T10:00:00+00:00",
) -> None:
    counts: dict[str, int] = {}
    for case in cases:
        counts[case["result"]] = counts.get(case["result"], 0) + 1
    report = {
        "date": date,
        "device": "cuda",
        "dtype": dtype,
        "candidate_mode": "gpu",
        "pytest_args": [
            "/repo/conformance",
            "-p",
            "no:cacheprovider",
            *args,
            "--conformance-report",
            "/tmp/r",
        ],
        "mutation": mutation,
        "versions": {
            "gpu": "NVIDIA H200",
            "unsloth": "2026.10.9",
            "transformers": "5.17.0",
            "torch": "2.11.0",
        },
        "shim": {"installed": True, "enabled": True, "status": {"verdict": "shim needed for: rope_scaling"}},
        "seconds": 12.0,
        "counts": counts,
        "cases": list(cases),
    }
    (root / leg).mkdir(parents=True, exist_ok=True)
    (root / leg / name).write_text(json.dumps(report), encoding="utf-8")


@pytest.fixture
def reports(tmp_path: Path) -> Path:
    root = tmp_path / "conformance-reports"
    # A full-suite shim run whose bounds come from rounding (a peer each), a partial stock run.
    _write(
        root,
        "2026.10",
        "shim.json",
        _case("test_forward_logits[qwen2-plain]", "pass", _m("logits_rel", 0.02, 0.05, peer=0.018)),
        _case("test_forward_logits[qwen3-plain]", "pass", _m("logits_rel", 0.015, 0.02, peer=0.009)),
        _case("test_chat_template[qwen3-plain-x]", "pass", _m("text_chars[multi_turn][thinking=on]", 0, 0)),
        _case(
            "test_quant[qwen3_moe-plain]",
            "refused",
            reason="_pytest.outcomes.XFailed: refused by unsloth_qwen_compat: no",
        ),
    )
    _write(
        root,
        "2026.10",
        "stock.json",
        _case("test_forward_logits[qwen2-plain]", "fail", _m("logits_rel", 0.9, 0.05, peer=0.018)),
        args=["-m", "forward", "-n", "3"],
    )
    # One mutation in two dtypes: named by header (fp32) and by file name (bf16).
    _write(
        root,
        "2026.10",
        "mutation-rope-base-1pct.json",
        _case("test_forward_logits[qwen2-plain]", "fail", _m("logits_rel", 0.3, 1e-4, "fp32")),
        _case("test_forward_logits[qwen3-plain]", "fail", _m("logits_rel", 0.2, 1e-4, "fp32")),
        dtype="fp32",
        args=["-k", "qwen"],
        mutation="rope-base-1pct",
    )
    _write(
        root,
        "2026.10",
        "mutation-rope-base-1pct.bf16.json",
        _case("test_forward_logits[qwen2-plain]", "pass", _m("logits_rel", 0.02, 0.05)),
        args=["-k", "qwen"],
        mutation="rope-base-1pct",
    )
    (root / "notes.json").write_text(
        json.dumps(
            {
                "page": ["a page note"],
                "runs": {
                    "2026.10/shim.json": {"date": "2026-12-03T10:00:00+00:00", "notes": ["ran at abc1234"]},
                    "2026.10/stock.json": {
                        "date": "2026-11-01T00:00:00+00:00",
                        "notes": ["an older run's note"],
                    },
                },
            }
        ),
        encoding="utf-8",
    )
    return root


def test_summary_mutations_and_details_say_what_the_reports_say(reports: Path) -> None:
    text, warnings = document.render(reports)
    lines = text.splitlines()
    # Summary: counts per run, and a partial run says so (from its pytest arguments).
    assert "| 2026.10 | shim | full suite | 3 | 1 | 0 | - | NVIDIA H200, bf16, 2026-12-03 |" in text
    assert "| 2026.10 | stock | partial: `-m forward` | 0 | 0 | **1** | - |" in text
    # Worst per metric: the largest against its own bound (0.015 of 0.02, not 0.02 of 0.05),
    # with the peer it was judged against; labels grouped by their quantity.
    (row,) = [line for line in lines if line.startswith("| logits_rel | bf16 |")]
    assert "0.015 (peer 0.009, <= 0.02) | `test_forward_logits[qwen3-plain]`" in row
    assert "**0.9** (peer 0.018, <= 0.05) | `test_forward_logits[qwen2-plain]`" in row
    assert any(line.startswith("| text_chars | bf16 | 0 (<= 0) |") for line in lines)
    # Mutations: dtype columns; caught, or NOT CAUGHT.
    assert "| leg | mutation | fp32 | bf16 |" in text
    assert (
        "| 2026.10 | `rope-base-1pct` | `test_forward_logits[qwen2-plain]` and 1 more (2 of 2 cases failed) "
        "| **NOT CAUGHT** (0 of 1 cases failed) |"
    ) in text
    # Details: every case, the peer beside its value, the refusal's reason; notes of the run.
    assert (
        "| `test_forward_logits[qwen2-plain]` | pass | logits_rel 0.02 (peer 0.018, <= 0.05) | **fail** |"
        in text
    )
    assert "| refused | refused by unsloth_qwen_compat: no |" in text
    assert "  - ran at abc1234" in lines and "- a page note" in lines
    # A note on a run the file no longer holds leaves the page, with a warning.
    assert "an older run's note" not in text
    assert len(warnings) == 1 and "2026.10/stock.json" in warnings[0]
    assert "## RoPE grid" not in text  # no grid cell in these reports


def test_a_run_stopped_by_its_time_limit_says_so(reports: Path) -> None:
    path = reports / "2026.10" / "stock.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**data, "collected": 40, "interrupted": True}), encoding="utf-8")
    text, _ = document.render(reports)
    assert "| 2026.10 | stock | partial: `-m forward`, **interrupted after 1 of 40 cases** |" in text


def test_reports_that_contradict_their_names_are_errors(reports: Path) -> None:
    _write(
        reports, "2026.10", "mutation-rope-yarn-linear.fp16.json", dtype="fp32", mutation="rope-yarn-linear"
    )
    with pytest.raises(raw_reports.ReportError, match="the name says fp16"):
        document.render(reports)
    (reports / "2026.10" / "mutation-rope-yarn-linear.fp16.json").unlink()
    _write(reports, "2026.10", "shim.bf16.json")
    with pytest.raises(raw_reports.ReportError, match="two shim runs in bf16"):
        document.render(reports)


def test_the_command_writes_the_page_and_checks_it(reports: Path, tmp_path: Path, capsys) -> None:
    page = tmp_path / "CONFORMANCE.md"
    assert document.main([str(page), "--reports", str(reports), "--check"]) == 1
    assert document.main([str(page), "--reports", str(reports)]) == 0
    assert page.read_text(encoding="utf-8") == document.render(reports)[0]
    assert document.main([str(page), "--reports", str(reports), "--check"]) == 0
    assert "warning:" in capsys.readouterr().err
    assert document.main([str(page), "--reports", str(tmp_path / "none")]) == 1


def test_collect_puts_a_gpu_runs_reports_in_place(reports: Path, tmp_path: Path, capsys) -> None:
    # conformance/offline_legs.sh's layout: DIR/<leg>/<run>/conformance.json.
    source = tmp_path / "gpu-run"
    for leg, run, dtype in [
        ("2026.10", "stock", "bf16"),  # replaces stock.json (same kind and dtype)
        ("2026.10", "shim", "fp32"),  # beside shim.json, which is bf16 and stays
        ("2026.10", "mutation-rope-base-1pct", "bf16"),  # replaces mutation-rope-base-1pct.bf16.json
        ("2025.3", "shim", "bf16"),  # a leg with no report yet
    ]:
        mutation = run.removeprefix("mutation-") if run.startswith("mutation-") else ""
        _write(
            source,
            f"{leg}/{run}",
            "conformance.json",
            _case("test_x[qwen2-plain]"),
            dtype=dtype,
            mutation=mutation,
            date="2026-12-04T00:00:00+00:00",
        )
    page = tmp_path / "CONFORMANCE.md"
    assert document.main([str(page), "--reports", str(reports), "--collect", str(source)]) == 0
    names = {p.relative_to(reports).as_posix() for p in reports.glob("*/*.json")}
    assert names == {
        "2026.10/shim.json",
        "2026.10/shim.fp32.json",
        "2026.10/stock.json",
        "2026.10/mutation-rope-base-1pct.json",
        "2026.10/mutation-rope-base-1pct.bf16.json",
        "2025.3/shim.json",
    }
    assert json.loads((reports / "2026.10/stock.json").read_text())["date"].startswith("2026-12-04")
    out = capsys.readouterr().out
    assert "(replaces stock.json)" in out and "(replaces mutation-rope-base-1pct.bf16.json)" in out
    # A run of another selection replaced: what only the old one measured is said to leave.
    assert "warning: the page loses the 1 cases only stock.json (`-m forward`) had" in out
    assert "notes on 2026.10/stock.json removed" in out
    assert list(json.loads((reports / "notes.json").read_text())["runs"]) == ["2026.10/shim.json"]
    assert document.render(reports)[1] == []  # no stale note left
    text = page.read_text(encoding="utf-8")
    assert "| 2026.10 | shim | full suite | 1 | 0 | 0 | - | NVIDIA H200, fp32, 2026-12-04 |" in text
    assert "| 2025.3 | shim | full suite | 1 |" in text
    assert "| case | shim (fp32) | measured | shim (bf16) | measured | stock (bf16) | measured |" in text
    assert "ran at abc1234" in text  # shim.json (bf16) stayed, and its note with it
    with pytest.raises(raw_reports.ReportError, match="to collect"):
        document.collect(tmp_path / "empty", reports)


def test_a_report_keeps_no_path_of_the_machine_it_ran_on():
    from conformance.report import portable_args

    args = ["/home/u/repo/conformance", "-k", "rope", "--conformance-report", "/tmp/x/shim", "/abs/extra.py"]
    assert portable_args(args) == ["conformance", "-k", "rope", "--conformance-report", "DIR", "extra.py"]
    committed = Path(__file__).resolve().parent.parent / "conformance-reports"
    for path in committed.glob("*/*.json"):
        if path.name == "notes.json":
            continue
        args = json.loads(path.read_text(encoding="utf-8")).get("pytest_args", [])
        assert not [a for a in args if a.startswith("/")], f"{path}: {args}"


def test_a_run_with_selected_cases_left_unfinished_reads_as_interrupted() -> None:
    """Under pytest-xdist a time limit's SIGINT can end the session with status 0 and no
    keyboard-interrupt hook (seen on a GPU run): the cases without a result say it stopped."""
    from conformance import report

    run = report.ConformanceReport(config=None, header={"versions": {}})
    run.collected, run.exitstatus = 3, 0
    run.rows = {
        "a": {"result": "pass"},
        "b": {"result": None},  # started, never finished
    }
    data = run.summary()
    assert data["interrupted"] is True
    run.rows["b"]["result"], run.rows["c"] = "fail", {"result": "pass"}
    data = run.summary()
    assert data["interrupted"] is False


def test_a_stopped_run_names_the_cases_it_was_inside() -> None:
    """A run stopped by its time limit says which cases were still running, and for how long:
    on a GPU, a leg that ended no case in 445 s said nothing else."""
    from conformance import report

    run = report.ConformanceReport(config=None, header={"versions": {}})
    run.collected, run.exitstatus = 3, 2
    run.rows = {"a": {"result": "pass"}}
    run.pytest_runtest_logstart("a", None)
    run.pytest_runtest_logstart("b", None)
    run.case_started["b"] -= 30
    data = run.summary()
    assert [case["nodeid"] for case in data["running"]] == ["b"]
    assert data["running"][0]["seconds"] >= 30
    assert any(line.startswith("still running when stopped: b (") for line in report.progress_lines(data))


def test_a_stopped_run_names_what_it_left_and_how_to_rerun_exactly_that(tmp_path) -> None:
    """The cases it was inside and those it never started, as a ``-k`` that selects them and no
    other (pytest's own parser, names matched as pytest does: substrings of the case's name).
    A whole-leg H200 run stopped with 8 cases running and 37 not started, and nothing named them."""
    from _pytest.mark.expression import Expression

    from conformance import raw_reports, report

    ids = [
        "conformance/test_lora.py::test_lora_gradients[qwen3-plain-FastModel]@group-a",
        "conformance/test_lora.py::test_lora_gradients[qwen3_moe-plain-FastModel]",
        "conformance/test_lora.py::test_lora_gradients[qwen3-plain-FastLanguageModel]",
        "conformance/test_decode.py::test_teacher_forced_decode[qwen3_5-plain-prompts[29, 14, 6, 3]-FastModel]",
        "conformance/test_forward.py::test_forward_logits[qwen3]",
        "conformance/test_decode.py::test_teacher_forced_decode[qwen3_5-plain-prompts[61, 40, 8]-FastModel]",
    ]
    run = report.ConformanceReport(config=None, header={"versions": {}})
    run.exitstatus = 2
    run.pytest_xdist_node_collection_finished(None, ids)
    run.rows = {i: {"nodeid": i, "result": "pass"} for i in ids[4:]}
    run.pytest_runtest_logstart(ids[1], None)
    data = run.summary()
    assert data["not_started"] == [ids[0], ids[2], ids[3]]
    left = raw_reports.unended(data)
    assert sorted(left) == sorted(ids[:4])
    k = Expression.compile(raw_reports.rerun_expression(left))
    names = [nodeid.split("::")[-1].split("@")[0] for nodeid in ids]
    picked = [name for name in names if k.evaluate(lambda sub, name=name: sub.lower() in name.lower())]
    assert picked == names[:4]  # the bracketed list's commas and spaces: spelled as pieces

    path = tmp_path / "conformance.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    assert raw_reports.main(["unended", str(path)]) == 0
    run.rows.update({i: {"nodeid": i, "result": "pass"} for i in ids[:4]})
    run.case_started.clear()
    run.exitstatus = 0
    path.write_text(json.dumps(run.summary()), encoding="utf-8")
    assert raw_reports.main(["unended", str(path)]) == 1  # nothing left
    # A stopped run's report from before not_started cannot name what it never started.
    old = {**data, "cases": [], "running": []}
    del old["not_started"]
    path.write_text(json.dumps(old), encoding="utf-8")
    assert raw_reports.main(["unended", str(path)]) == 2


def _report_header() -> dict:
    """A GPU run's report header, as conftest.py writes it (the parts the pages read); fresh
    each time: a report writes into its header's versions."""
    return {
        "date": "2026-12-03T11:00:00+00:00",
        "versions": {"gpu": "NVIDIA H200"},
        "candidate_mode": "gpu",
        "dtype": "fp32",
        "device": "cuda",
        "shim": {"installed": True, "enabled": True},
    }


def test_only_the_controller_writes_the_report_and_writes_it_after_an_internal_error(tmp_path) -> None:
    """On an H200 a time limit's SIGINT reached pytest-xdist's controller inside its event loop:
    pytest ended with an internal error, skipped the terminal summary where the report was
    written, and a worker's report (its 53 cases of the run's 238) was left as the run's."""
    from conformance import report

    class Config:
        def __init__(self, directory, worker: bool) -> None:
            self.directory = directory
            if worker:
                self.workerinput = {"workerid": "gw0"}

        def getoption(self, name):
            assert name == "conformance_report"
            return str(self.directory)

    worker = report.ConformanceReport(config=Config(tmp_path / "w", worker=True), header=_report_header())
    worker.rows = {"a": {"result": "pass"}}
    worker.pytest_sessionfinish(session=None, exitstatus=2)
    assert not (tmp_path / "w").exists()

    controller = report.ConformanceReport(
        config=Config(tmp_path / "c", worker=False), header=_report_header()
    )
    controller.collected = 2
    controller.rows = {
        "a": {"case": "a", "nodeid": "t::a", "result": "pass", "metrics": [], "reason": "", "seconds": 1.0}
    }
    controller.pytest_sessionfinish(session=None, exitstatus=3)  # INTERNAL_ERROR: no terminal summary
    data = json.loads((tmp_path / "c" / "conformance.json").read_text())
    assert data["exitstatus"] == 3 and data["interrupted"] is True and data["counts"] == {"pass": 1}
    assert (tmp_path / "c" / "conformance.md").is_file()


def _passed(nodeid: str, seconds: float, user_properties: list, **more):
    """A passed case's call report, as pytest (or pytest-xdist's controller) hands it over."""
    from types import SimpleNamespace

    return SimpleNamespace(
        nodeid=nodeid,
        duration=seconds,
        when="call",
        outcome="passed",
        skipped=False,
        failed=False,
        longrepr=None,
        user_properties=user_properties,
        **more,
    )


def test_a_report_says_where_the_cases_seconds_went() -> None:
    """Each case's timing (the conftest's ``_timing`` fixture, carried as a user property like
    the metrics) adds up in the report: a slow leg says whether references, kernel warm-ups
    or the workers' setup took the time."""

    from conformance import report

    run = report.ConformanceReport(config=None, header={"versions": {}})

    def log(nodeid: str, seconds: float, timing: dict) -> None:
        run.pytest_runtest_logreport(_passed(nodeid, seconds, [(report.TIMING_PROPERTY, timing)]))

    setup = {"zoo_s": 8.0, "oracle_up_front_s": 40.0, "oracle_share": 12}
    log(
        "t::a",
        50.0,
        {
            "oracle_compute_s": 0.0,
            "oracle_wait_s": 0.0,
            "oracle_load_s": 0.1,
            "warm_wait_s": 0.0,
            "session_setup": setup,
        },
    )
    log(
        "t::b", 5.0, {"oracle_compute_s": 1.5, "oracle_wait_s": 2.5, "oracle_load_s": 0.1, "warm_wait_s": 0.0}
    )
    log(
        "t::c",
        70.0,
        {
            "oracle_compute_s": 0.0,
            "oracle_wait_s": 0.0,
            "oracle_load_s": 0.0,
            "warm_wait_s": 60.0,
            "session_setup": {**setup, "oracle_up_front_s": 30.0},
        },
    )
    split = run.summary()["time_split"]
    assert split == {
        "case_s": 125.0,
        "oracle_compute_s": 1.5,
        "oracle_wait_s": 2.5,
        "oracle_load_s": 0.2,
        "warm_wait_s": 60.0,
        "setup_zoo_s": 16.0,
        "setup_zoo_max_s": 8.0,
        "setup_oracle_up_front_s": 70.0,
        "setup_oracle_up_front_max_s": 40.0,
    }
    assert (
        "up-front references 70.0 (slowest worker 40.0)" in report.time_split_lines({"time_split": split})[0]
    )
    page = report.markdown({**run.summary(), **_report_header()})
    assert "- case seconds 125.0: references computed 1.5" in page
    assert report.time_split([{"seconds": 1.0}]) is None  # a report from before timings


def test_a_report_gives_each_workers_span() -> None:
    """Under pytest-xdist each case records its worker and when it started: the report gives each
    worker's first start and last end, so a slow leg shows its setup delay and its tail."""
    from types import SimpleNamespace

    from conformance import report

    run = report.ConformanceReport(config=None, header={"versions": {}})
    for nodeid, worker, seconds, started_ago in [
        ("t::a", "gw0", 10.0, 100.0),
        ("t::b", "gw0", 20.0, 80.0),
        ("t::c", "gw1", 5.0, 60.0),
        ("t::d", None, 1.0, 50.0),  # without xdist: no worker, left out of the spans
    ]:
        run.pytest_runtest_logstart(nodeid, None)
        run.case_started[nodeid] = run.started + 100.0 - started_ago
        node = SimpleNamespace(gateway=SimpleNamespace(id=worker)) if worker else None
        run.pytest_runtest_logreport(_passed(nodeid, seconds, [], node=node))
    data = run.summary()
    assert data["workers"] == {
        "gw0": {"first_started_s": 0.0, "ended_s": 40.0, "cases": 2},
        "gw1": {"first_started_s": 40.0, "ended_s": 45.0, "cases": 1},
    }
    assert {case["nodeid"]: case.get("worker") for case in data["cases"]}["t::d"] is None
    line = report.time_split_lines(data)[0]
    assert line == "2 workers: first cases started 0-40 s into the run, last cases ended 40-45 s"
    assert report.worker_timeline([{"seconds": 1.0}]) is None  # a report from before workers
