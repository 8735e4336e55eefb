"""Collects each case's result and measured errors; writes conformance.json / .md.

Tests record numbers through the ``record`` fixture (conftest.py), which stores them in
the test's ``user_properties``; pytest hands those to ``pytest_runtest_logreport`` here
(also across pytest-xdist workers). At the end of the run a short table is printed (the
tail of the output is often all one sees of a remote run) and, with
``--conformance-report DIR``, the full report is written to DIR.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path

import pytest

from conformance import raw_reports, versions

PROPERTY = "conformance"
#: Where a case's seconds went (conftest.py's ``_timing``): the oracle's part, the kernel
#: warm-up waited for, and a worker's session setup on its first case.
TIMING_PROPERTY = "conformance_timing"


def _reason(report) -> str:
    longrepr = report.longrepr
    if report.skipped and isinstance(longrepr, tuple):
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message.strip().splitlines()[0]
    return str(longrepr).strip().splitlines()[-1] if longrepr else ""


def portable_args(args: list[str]) -> list[str]:
    """The run's pytest arguments without the paths of the machine it ran on: the suite's
    directory reads ``conformance``, the report directory ``DIR``, any other absolute path
    its last part (a committed report says what was selected, not where it lived)."""
    out, after_report = [], False
    for arg in map(str, args):
        if after_report:
            out.append("DIR")
        elif arg.startswith("/"):
            out.append(Path(arg).name)
        else:
            out.append(arg)
        after_report = arg == "--conformance-report"
    return out


class ConformanceReport:
    def __init__(self, config, header: dict) -> None:
        self.config = config
        self.header = header
        self.rows: dict[str, dict] = {}
        self.started = time.time()
        # How many cases the run selected and how it ended: a run stopped by a time limit (SIGINT,
        # pytest's exit status 2) writes the cases it finished, and must not read as complete.
        self.collected: int | None = None
        # Their node ids: a stopped run names the cases it never started, so that a re-run
        # (python -m conformance.raw_reports unended) selects exactly what is left.
        self.collected_ids: list[str] = []
        self.exitstatus: int | None = None
        self.interrupted = False  # under pytest-xdist, SIGINT can end the session with status 0
        # When each case started (workers forward it to the controller): a stopped run names
        # the cases it was inside, and for how long, rather than only how many ended.
        self.case_started: dict[str, float] = {}
        # The hybrid kernels' warm-up folder (conftest.py sets it on a GPU run under xdist).
        self.warm_dir: Path | None = None
        # The report as written at the session's end, and where (None: not written).
        self.data: dict | None = None
        self.written: Path | None = None

    def pytest_collection_finish(self, session) -> None:
        self.collected_ids = [item.nodeid for item in session.items]
        self.collected = len(self.collected_ids)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids) -> None:  # the controller under -n
        self.collected_ids = list(ids)
        self.collected = len(ids)

    def pytest_runtest_logstart(self, nodeid, location) -> None:
        self.case_started.setdefault(nodeid, time.time())

    def pytest_keyboard_interrupt(self, excinfo) -> None:
        self.interrupted = True

    def pytest_sessionfinish(self, session, exitstatus) -> None:  # before the terminal summary
        """Write the report here, not in the terminal summary: pytest skips the summary after an
        internal error, which is how pytest-xdist's controller can end when a time limit's
        SIGINT reaches it inside its event loop (seen on an H200: no report was written). Only
        the controller writes (or a run without xdist): a worker holds only its own cases, and
        its report, left in place by a controller that did not write, read as the whole run's."""
        self.exitstatus = int(exitstatus)
        if self.config is None or hasattr(self.config, "workerinput"):
            return
        self.data = self.summary()
        directory = self.config.getoption("conformance_report")
        if directory:
            out = Path(directory)
            out.mkdir(parents=True, exist_ok=True)
            (out / "conformance.json").write_text(
                json.dumps(self.data, indent=1, default=str), encoding="utf-8"
            )
            (out / "conformance.md").write_text(markdown(self.data), encoding="utf-8")
            self.written = out

    def pytest_runtest_logreport(self, report) -> None:
        row = self.rows.setdefault(
            report.nodeid,
            {
                "case": report.nodeid.split("::")[-1],
                "nodeid": report.nodeid,
                "result": None,
                "metrics": [],
                "reason": "",
                "seconds": 0.0,
            },
        )
        row["seconds"] += report.duration
        # Which pytest-xdist worker ran it (none without xdist): with ``started_s`` (summary),
        # each worker's timeline, where a slow leg's idle and setup seconds show.
        worker = getattr(getattr(getattr(report, "node", None), "gateway", None), "id", None)
        if worker:
            row["worker"] = worker
        metrics = [value for key, value in report.user_properties if key == PROPERTY]
        if metrics:
            row["metrics"] = metrics
        for key, value in report.user_properties:
            if key == TIMING_PROPERTY:
                row["timing"] = value
        if report.when == "call" or report.outcome != "passed":
            if report.skipped:
                result = "xfail" if hasattr(report, "wasxfail") else "skip"
                # The shim's refusal, or Unsloth's own (candidate.refusal).
                if str(getattr(report, "wasxfail", "")).startswith(
                    ("refused by unsloth_qwen_compat", "refused by Unsloth")
                ):
                    result = "refused"
            elif report.failed:
                result = "fail" if report.when == "call" else "error"
            else:
                result = "pass"
            # A teardown error after a pass must not be hidden by the pass.
            if row["result"] in (None, "pass") or result in ("fail", "error"):
                row["result"] = result
                row["reason"] = _reason(report) if result != "pass" else ""

    def summary(self) -> dict:
        import torch

        # Read again at the end: a library that turns TF32 on during the run would break the
        # fp32 bounds, and this is where that shows.
        self.header["versions"]["tf32_matmul_at_end"] = bool(torch.backends.cuda.matmul.allow_tf32)
        counts: dict[str, int] = {}
        for nodeid, row in self.rows.items():
            if nodeid in self.case_started:  # seconds into the run when it started
                row["started_s"] = round(self.case_started[nodeid] - self.started, 1)
            counts[row["result"]] = counts.get(row["result"], 0) + 1
        data = {
            **self.header,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.time() - self.started, 1),
            "collected": self.collected,
            "exitstatus": self.exitstatus,
            "interrupted": self.interrupted or self.exitstatus == int(pytest.ExitCode.INTERRUPTED),
            "counts": counts,
            "cases": list(self.rows.values()),
        }
        # Under pytest-xdist a SIGINT (a time limit) can end the session with status 0 and no
        # keyboard-interrupt hook: a selected case without a result is what says it stopped.
        data["interrupted"] = data["interrupted"] or bool(raw_reports.unfinished(data))
        now = time.time()
        running = [
            {"nodeid": nodeid, "seconds": round(now - started, 1)}
            for nodeid, started in self.case_started.items()
            if not (self.rows.get(nodeid) or {}).get("result")
        ]
        if running:
            data["running"] = running
        # Always written (an empty list too): its presence says the report names every case
        # it did not end (raw_reports.unended), which reports from before it cannot.
        data["not_started"] = [
            nodeid
            for nodeid in self.collected_ids
            if nodeid not in self.rows and nodeid not in self.case_started
        ]
        split = time_split(data["cases"])
        if split:
            data["time_split"] = split
        spans = worker_timeline(data["cases"])
        if spans:
            data["workers"] = spans
        if self.warm_dir is not None:
            from conformance import warm_kernels

            data["warm_kernels"] = warm_kernels.state(self.warm_dir)
        return data

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.data is None:
            return  # an xdist worker: the controller reports
        data = self.data
        write = terminalreporter.write_line
        terminalreporter.section("conformance summary")
        # One line per case, then the header: the end of the output is what a remote run shows.
        for line in compact_lines(data["cases"]):
            write(line)
        for line in header_lines(data):
            write(line)
        if self.written is not None:
            out = self.written
            write(f"conformance report written to {out / 'conformance.json'} and {out / 'conformance.md'}")


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def shim_patches(shim: dict) -> list[dict]:
    """The per-patch verdicts from unsloth_qwen_compat.status(), if it has that shape."""
    status = shim.get("status")
    patches = status.get("patches") if isinstance(status, dict) else None
    return [p for p in patches if isinstance(p, dict)] if isinstance(patches, list) else []


def header_lines(data: dict) -> list[str]:
    env = data["versions"]
    shim = data["shim"]
    shim_text = (
        "not installed" if not shim.get("installed") else ("enabled" if shim.get("enabled") else "DISABLED")
    )
    counts = ", ".join(f"{k}={v}" for k, v in sorted(data["counts"].items(), key=lambda kv: str(kv[0])))
    status = shim.get("status")
    verdict = status.get("verdict") if isinstance(status, dict) else None
    patches = ", ".join(f"{p.get('name')}={p.get('verdict')}/{p.get('action')}" for p in shim_patches(shim))
    return [
        f"date {data['date']}  gpu {env['gpu']}  candidate {data['candidate_mode']}  dtype {data['dtype']}",
        f"shim {shim_text}" + (f": {verdict}" if verdict else "") + (f"  [{patches}]" if patches else ""),
        versions.one_line(env),
        f"{counts}  ({data['seconds']}s)",
        *time_split_lines(data),
        *progress_lines(data),
    ]


def time_split(cases: list[dict]) -> dict | None:
    """Where the cases' seconds went, summed over every case (every worker): the references
    (computed, waited for, loaded), the kernel warm-ups waited for, and the workers' session
    setup (zoo models built, their up-front share of the references); the rest is the
    candidate's (loading the model, running it, comparing). None for a report without timings
    (written before they were recorded)."""
    timed = [case["timing"] for case in cases if case.get("timing")]
    if not timed:
        return None
    split = {"case_s": round(sum(case.get("seconds") or 0.0 for case in cases), 1)}
    for name in ("oracle_compute_s", "oracle_wait_s", "oracle_load_s", "warm_wait_s"):
        split[name] = round(sum(t.get(name, 0.0) for t in timed), 1)
    setups = [t["session_setup"] for t in timed if t.get("session_setup")]
    for name in ("zoo_s", "oracle_up_front_s"):
        values = [setup[name] for setup in setups if name in setup]
        split[f"setup_{name}"] = round(sum(values), 1)
        split[f"setup_{name.removesuffix('_s')}_max_s"] = round(max(values, default=0.0), 1)
    return split


def worker_timeline(cases: list[dict]) -> dict | None:
    """Each pytest-xdist worker's span, in seconds into the run: when its first case started
    (the session's setup delays it), when its last one ended, and how many it ran. The spread of
    the ends is the leg's tail: a leg whose workers end far apart waits on its slowest one. None
    for a run without workers (or a report from before they were recorded)."""
    spans: dict[str, dict] = {}
    for case in cases:
        worker, started = case.get("worker"), case.get("started_s")
        if worker is None or started is None:
            continue
        span = spans.setdefault(worker, {"first_started_s": started, "ended_s": 0.0, "cases": 0})
        span["first_started_s"] = min(span["first_started_s"], started)
        span["ended_s"] = round(max(span["ended_s"], started + (case.get("seconds") or 0.0)), 1)
        span["cases"] += 1
    return dict(sorted(spans.items(), key=lambda item: int(item[0].lstrip("gw") or 0))) or None


def time_split_lines(data: dict) -> list[str]:
    lines = []
    spans = data.get("workers")
    if spans:
        firsts = [span["first_started_s"] for span in spans.values()]
        ends = [span["ended_s"] for span in spans.values()]
        lines.append(
            f"{len(spans)} workers: first cases started {min(firsts):g}-{max(firsts):g} s into the run, "
            f"last cases ended {min(ends):g}-{max(ends):g} s"
        )
    split = data.get("time_split")
    if not split:
        return lines
    return lines + [
        "case seconds {case_s}: references computed {oracle_compute_s}, waited for {oracle_wait_s}, "
        "loaded {oracle_load_s}; kernel warm-ups waited for {warm_wait_s}; session setup: zoo "
        "{setup_zoo_s} (slowest worker {setup_zoo_max_s}), up-front references {setup_oracle_up_front_s} "
        "(slowest worker {setup_oracle_up_front_max_s})".format(**split)
    ]


def progress_lines(data: dict) -> list[str]:
    """What a stopped run was doing: the cases it was inside, and the kernel warm-ups' state."""
    lines = [
        f"still running when stopped: {case['nodeid'].split('::')[-1]} ({case['seconds']} s)"
        for case in data.get("running", [])
    ]
    for kind, state in data.get("warm_kernels", {}).items():
        models = ", ".join(
            f"{m['model']} {m['seconds']} s" if "seconds" in m else f"{m['model']} {m.get('error', '?')[:80]}"
            for m in state.get("models", [])
        )
        lines.append(f"kernel warm-up {kind}: {state['state']}" + (f" ({models})" if models else ""))
    return lines


def _metric_rows(case: dict):
    if not case["metrics"]:
        yield "-", "-"
        return
    for m in case["metrics"]:
        yield f"{m['metric']} {_fmt(m['value'])}", _fmt(m["bound"])


def compact_lines(cases: list[dict]) -> list[str]:
    """``case  result  label value (bound b), ...`` and, for non-passes, the reason."""
    width = max([len(c["case"]) for c in cases] + [4])
    lines = []
    for case in cases:
        numbers = ", ".join(
            f"{m['metric']} {_fmt(m['value'])}"
            + (f" (<= {_fmt(m['bound'])})" if m["bound"] is not None else "")
            for m in case["metrics"]
        )
        lines.append(f"{case['case']:<{width}} {case['result'] or '?':<5} {numbers}".rstrip())
        if case["reason"] and case["result"] != "pass":
            lines.append(f"{'':<{width}} -> {case['reason'][:200]}")
    return lines


def table_lines(cases: list[dict], markdown: bool = True) -> list[str]:
    """The Markdown table: one row per measured number."""
    lines = ["| case | result | measured error | bound |", "|---|---|---|---|"]
    for case in cases:
        first = True
        for measured, bound in _metric_rows(case):
            name, result = (case["case"], case["result"] or "?") if first else ("", "")
            lines.append(f"| {name} | {result} | {measured} | {bound} |")
            first = False
        if case["reason"] and case["result"] != "pass":
            lines.append(f"| | | {case['reason']} | |")
    return lines


def markdown(data: dict) -> str:
    env = data["versions"]
    out = [
        "# Conformance report",
        "",
        f"- date: {data['date']}",
        f"- GPU: {env['gpu']}",
        f"- candidate: Unsloth ({data['candidate_mode']}), dtype {data['dtype']}, device {data['device']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "- result: "
        + ", ".join(f"{k} {v}" for k, v in sorted(data["counts"].items(), key=lambda kv: str(kv[0])))
        + f" in {data['seconds']} s",
        *(f"- {line}" for line in time_split_lines(data)),
        *(f"- {line}" for line in progress_lines(data)),
        "",
        "## Shim",
        "",
    ]
    shim = data["shim"]
    out.append(f"- installed: {shim.get('installed')}, enabled: {shim.get('enabled')}")
    if shim.get("note"):
        out.append(f"- {shim['note']}")
    patches = shim_patches(shim)
    if patches:
        out += ["", "| patch | verdict | action | reason |", "|---|---|---|---|"]
        out += [
            f"| {p.get('name')} | {p.get('verdict')} | {p.get('action')} | {p.get('reason', '')} |"
            for p in patches
        ]
    for name in ("status", "environment"):
        if name in shim:
            out += [
                "",
                f"`unsloth_qwen_compat.{name}()`:",
                "",
                "```json",
                json.dumps(shim[name], indent=1, default=str),
                "```",
            ]
    out += ["", "## Cases", ""] + table_lines(data["cases"], markdown=True) + [""]
    return "\n".join(out)
