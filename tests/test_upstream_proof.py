"""The retire proof's comparison and merge (conformance/upstream_proof.py), the proof scripts'
plumbing, and the RoPE table of a leg run only without the shim, on made-up reports (CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conformance import raw_reports, rope_table, upstream_proof

from .conftest import REPO


def _case(name, result, **metrics):
    return {
        "case": name,
        "nodeid": f"conformance/x.py::{name}",
        "result": result,
        "metrics": [{"metric": k, "value": v, "bound": 1e-5} for k, v in metrics.items()],
        "reason": "" if result == "pass" else f"{result} because",
        "seconds": 1.0,
    }


def _report(cases, unsloth="2026.10.9", enabled=True, args=("-m", "rope"), collected=None, interrupted=False):
    counts: dict[str, int] = {}
    for case in cases:
        counts[case["result"]] = counts.get(case["result"], 0) + 1
    return {
        "date": "2026-12-02T00:00:00+00:00",
        "device": "cuda",
        "dtype": "fp32",
        "candidate_mode": "gpu",
        "mutation": "",
        "pytest_args": list(args),
        "versions": {"unsloth": unsloth, "transformers": "5.17.0", "gpu": "NVIDIA H200"},
        "shim": {"installed": True, "enabled": enabled},
        "finished": "2026-12-02T00:05:00+00:00",
        "seconds": 300.0,
        "counts": counts,
        "collected": len(cases) if collected is None else collected,
        "exitstatus": 2 if interrupted else 0,
        "interrupted": interrupted,
        "cases": cases,
    }


QWEN = "test_rope_grid[qwen3-yarn-past_coverage-407-FastLanguageModel]"
CONTROL = "test_rope_grid[llama-dynamic-past_coverage-203-FastLanguageModel]"
TYPO = "test_lora_target_typo_is_rejected[qwen2-plain-FastLanguageModel]"


def test_the_same_outcomes_prove_it_and_a_refused_control_is_explained() -> None:
    shim = _report(
        [
            _case(QWEN + "@rope_grid-qwen3", "pass", logits_rel_vs_exposed=1.3e-6),
            _case(CONTROL, "pass", control_shim_vs_stock_max_abs=0.0),
            _case(TYPO, "pass", typo_accepted=0),
        ]
    )
    upstream = _report(
        [
            _case(QWEN + "@rope_grid-qwen3", "pass", logits_rel_vs_exposed=1.4e-6),
            _case(CONTROL, "refused"),  # the series holds Llama to the contract too
            _case(TYPO, "pass", typo_accepted=0),
        ],
        unsloth="2026.10.9+qwencompat",
        enabled=False,
    )
    result = upstream_proof.compare(shim, upstream)
    assert result["proven"]
    assert result["counts"] == {"same": 2, "explained: control held to the contract, refused": 1}
    assert result["largest_metric_ratio_of_same_cases"] == pytest.approx(1.4 / 1.3)
    # Under the floor (1% of the bound, at least fp32's last bit 2**-23) a value is the floor:
    # 0 against 1e-7 is no ratio; 0 against 5e-6 is 5e-6 over the floor (1e-6 with bound 1e-4).
    assert upstream_proof._ratio({"loss_rel": 0.0}, {"loss_rel": 1e-7}, {"loss_rel": 1e-5}) is None
    assert upstream_proof._ratio({"loss_rel": 0.0}, {"loss_rel": 5e-6}, {"loss_rel": 1e-4}) == pytest.approx(
        5.0
    )
    assert upstream_proof._ratio({"loss_rel": 0.0}, {"loss_rel": 1.3e-7}) == pytest.approx(1.3e-7 / 2**-23)
    assert upstream_proof._ratio({"loss_rel": 1e-3}, {"loss_rel": 2e-3}, {"loss_rel": 1e-2}) == pytest.approx(
        2.0
    )
    text = upstream_proof.render(result)
    assert "PROVEN" in text and "NOT PROVEN" not in text


@pytest.mark.parametrize(
    ("shim_result", "upstream_result", "verdict", "proven"),
    [
        ("pass", "fail", "FAILS in the patched run", False),
        ("pass", "refused", "DIFFERENT", False),  # a Qwen cell refused where the shim trained it
        ("refused", "pass", "DIFFERENT", False),
        ("fail", "pass", "better in the patched run", True),
    ],
)
def test_a_qwen_case_that_ends_otherwise(shim_result, upstream_result, verdict, proven) -> None:
    result = upstream_proof.compare(
        _report([_case(QWEN, shim_result)]), _report([_case(QWEN, upstream_result)], enabled=False)
    )
    assert result["counts"] == {verdict: 1} and result["proven"] is proven


def test_nothing_in_common_proves_nothing() -> None:
    result = upstream_proof.compare(_report([_case(QWEN, "pass")]), _report([_case(TYPO, "pass")]))
    assert not result["proven"]
    assert result["counts"] == {"only in the shim run": 1, "only in the patched run": 1}


def test_a_case_only_one_run_reached_leaves_it_unproven() -> None:
    both = [_case(QWEN, "pass")]
    result = upstream_proof.compare(_report(both), _report([*both, _case(TYPO, "pass")], enabled=False))
    assert result["counts"] == {"same": 1, "only in the patched run": 1}
    assert not result["proven"]


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"interrupted": True}, "interrupted after 1 of 1 cases"),
        ({"collected": 170}, "1 of 170 cases ended"),
        ({"collected": "absent"}, "does not record how many cases were selected"),
    ],
)
def test_runs_stopped_by_a_time_limit_prove_nothing(changes, why) -> None:
    """Two runs stopped at their time limit agreed on the 63 cases both reached (seen on an H200):
    that must read NOT PROVEN, whatever the cases say."""
    shim = _report([_case(QWEN, "pass")])
    upstream = _report([_case(QWEN, "pass")], enabled=False)
    for key, value in changes.items():
        if value == "absent":
            del upstream[key]
        else:
            upstream[key] = value
    result = upstream_proof.compare(shim, upstream)
    assert result["counts"] == {"same": 1}
    assert not result["proven"]
    assert why in result["incomplete"]["patched, shim off"]
    text = upstream_proof.render(result)
    assert "NOT PROVEN: patched, shim off run incomplete" in text
    assert upstream_proof.compare(shim, _report([_case(QWEN, "pass")], enabled=False))["proven"]


def test_merge_joins_parts_and_refuses_overlaps(tmp_path) -> None:
    a = _report([_case(QWEN, "pass"), _case(CONTROL, "refused")], args=("-m", "rope"))
    b = _report([_case(TYPO, "pass")], args=("-m", "not rope"))
    merged = upstream_proof.merge([a, b], ["a.json", "b.json"])
    assert merged["counts"] == {"pass": 2, "refused": 1}
    assert merged["pytest_args"] == ["-m", "rope", "-m", "not rope"]
    assert [m["source"] for m in merged["merged_from"]] == ["a.json", "b.json"]
    assert merged["seconds"] == 600.0
    assert merged["collected"] == 3 and merged["interrupted"] is False
    stopped = upstream_proof.merge([a, _report([_case(TYPO, "pass")], interrupted=True)], ["a", "b"])
    assert stopped["interrupted"] is True
    with pytest.raises(ValueError, match="is in both"):
        upstream_proof.merge([a, a], ["a.json", "again.json"])
    with pytest.raises(ValueError, match="another Unsloth"):
        upstream_proof.merge([a, _report([_case(TYPO, "pass")], unsloth="2025.10.12")], ["a", "c"])


def test_merge_rerun_puts_later_results_over_a_stopped_run(tmp_path) -> None:
    """A run stopped at its time limit (one case never ended) and a re-run of that case and of
    one whose test changed: the later results win, and the whole is complete only when every
    case the first run selected has ended."""
    whole = _report([_case(QWEN, "pass"), _case(CONTROL, "fail")], interrupted=True)
    whole["collected"] = 3
    again = _report([_case(CONTROL, "pass"), _case(TYPO, "pass")])
    merged = upstream_proof.merge([whole, again], ["whole", "again"], rerun=True)
    assert merged["counts"] == {"pass": 3}
    assert merged["collected"] == 3 and merged["finished_cases"] == 3 and merged["interrupted"] is False
    assert merged["reran"] == {upstream_proof.case_name(_case(CONTROL, "pass")): "again"}
    assert raw_reports.is_complete(merged)
    partial = upstream_proof.merge([whole, _report([_case(CONTROL, "pass")])], ["whole", "again"], rerun=True)
    assert partial["interrupted"] is True and not raw_reports.is_complete(partial)
    stopped_again = _report([{**_case(QWEN, "pass"), "result": None}])
    kept = upstream_proof.merge([whole, again, stopped_again], ["whole", "again", "stopped"], rerun=True)
    assert kept["counts"] == {"pass": 3} and "stopped" not in kept["reran"].values()
    # What is left is what no part ended: a first run's never-started case that a re-run ended
    # is not left; one that a re-run was inside when it stopped is.
    first = _report([_case(QWEN, "pass")], interrupted=True)
    first.update(collected=3, not_started=[_case(CONTROL, "x")["nodeid"], _case(TYPO, "x")["nodeid"]])
    second = _report([_case(CONTROL, "pass"), {**_case(TYPO, "pass"), "result": None}], interrupted=True)
    second["running"] = [{"nodeid": _case(TYPO, "x")["nodeid"], "seconds": 9.0}]
    left = upstream_proof.merge([first, second], ["first", "second"], rerun=True)
    assert left["not_started"] == [] and [r["nodeid"] for r in left["running"]] == [
        _case(TYPO, "x")["nodeid"]
    ]
    assert raw_reports.unended(left) == [_case(TYPO, "x")["nodeid"]]
    assert raw_reports.counts(left) == "2 pass, 0 fail, 1 not ended"
    # A part that is itself a merge (a join of parts, then re-runs over it) names its own parts.
    joined = upstream_proof.merge([whole, _report([_case(TYPO, "pass")])], ["core.json", "hybrid.json"])
    over = upstream_proof.merge([joined, again], ["joined.json", "again.json"], rerun=True)
    assert [m["source"] for m in over["merged_from"]] == ["core.json", "hybrid.json", "again.json"]
    assert [bool(m.get("rerun")) for m in over["merged_from"]] == [False, False, True]
    whole["collected"] = 2
    with pytest.raises(ValueError, match="not a re-run of it"):
        upstream_proof.merge([whole, again], ["whole", "again"], rerun=True)
    with pytest.raises(ValueError, match="is in both"):
        upstream_proof.merge([whole, again], ["whole", "again"])


def test_a_merge_selected_what_its_joined_parts_did() -> None:
    """``-k X`` and ``-k not (X)`` joined are the whole suite; re-runs over them add nothing."""
    core = _report([_case(QWEN, "pass")], args=("-k", "not (qwen3_5 or qwen3_next)"))
    hybrid = _report([_case(TYPO, "pass")], args=("-k", "qwen3_5 or qwen3_next"))
    again = _report([_case(TYPO, "pass")], args=("-k", "typo"))
    joined = upstream_proof.merge([core, hybrid], ["core", "hybrid"])
    assert raw_reports.selection(joined) == "every case" and not raw_reports.is_partial(joined)
    over = upstream_proof.merge([joined, again], ["joined", "again"], rerun=True)
    assert raw_reports.selection(over) == "every case"
    # A re-run that selected more than the first run (here a non-hybrid case) adds only what
    # the first selected.
    hybrid_typo, plain_typo = TYPO.replace("qwen2-plain", "qwen3_5-plain"), TYPO
    first = _report([_case(hybrid_typo, "fail")], args=("-k", "qwen3_5 or qwen3_next"))
    wider = _report([_case(hybrid_typo, "pass"), _case(plain_typo, "pass")], args=("-k", "typo"))
    only = upstream_proof.merge([first, wider], ["first", "wider"], rerun=True)
    assert [(c["case"], c["result"]) for c in only["cases"]] == [(hybrid_typo, "pass")]
    assert only["outside_selection"] == {plain_typo: "wider"}
    half = upstream_proof.merge([core, again], ["core", "again"])
    assert raw_reports.selection(half) == "`-k not (qwen3_5 or qwen3_next)` + `-k typo`"
    assert raw_reports.is_partial(half)


def test_the_command_line_writes_the_comparison_and_exits_by_the_verdict(tmp_path) -> None:
    shim, upstream = tmp_path / "shim.json", tmp_path / "upstream.json"
    shim.write_text(json.dumps(_report([_case(QWEN, "pass")])))
    upstream.write_text(json.dumps(_report([_case(QWEN, "fail")], enabled=False)))
    command = [sys.executable, "-m", "conformance.upstream_proof", "compare", str(shim), str(upstream)]
    done = subprocess.run(
        [*command, "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr
    assert "NOT PROVEN" in done.stdout
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["counts"] == {
        "FAILS in the patched run": 1
    }


def test_the_proof_scripts_parse_and_name_their_parts(tmp_path) -> None:
    for script in ("upstream_proof.sh", "build_patched_unsloth.sh", "offline_legs.sh"):
        done = subprocess.run(
            ["bash", "-n", str(REPO / "conformance" / script)], capture_output=True, text=True
        )
        assert done.returncode == 0, (script, done.stderr)
    done = subprocess.run(
        ["bash", str(REPO / "conformance" / "upstream_proof.sh"), str(tmp_path), "nonsense"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "PART must be defects, rest, core, hybrid or all" in done.stderr
    assert list(tmp_path.iterdir()) == []  # refused before building or running anything


def test_a_leg_run_without_the_shim_shows_what_unsloth_did_alone(tmp_path) -> None:
    stock_only = _report(
        [
            _case(
                "test_rope_grid[qwen3-yarn-past_coverage-407-FastLanguageModel]",
                "pass",
                logits_rel_vs_exposed=1e-6,
            ),
            _case("test_rope_grid[qwen3-yarn-inside-86-FastLanguageModel]", "pass", logits_rel=1e-6),
            _case("test_rope_grid[qwen3-dynamic-past_coverage-270-FastLanguageModel]", "refused"),
            _case("test_rope_grid[llama-dynamic-past_coverage-203-FastLanguageModel]", "refused"),
            _case("test_rope_grid[llama-yarn-inside-103-FastLanguageModel]", "pass", logits_rel=1e-6),
        ],
        unsloth="2026.10.9+qwencompat",
        enabled=False,
    )
    (tmp_path / "2026.10-upstream").mkdir()
    (tmp_path / "2026.10-upstream" / "stock.json").write_text(json.dumps(stock_only))
    lines = rope_table.table(rope_table.read(tmp_path))
    rows = {line.split(" | ")[0]: line for line in lines if line.startswith("| ")}
    assert "inside M: right; past coverage: extended" in rows["| `yarn`"]
    assert "past coverage: refused" in rows["| `dynamic`"]
    assert "stock:" not in rows["| `yarn`"]  # its stock run is the column itself
    assert lines[-1].endswith("2026.10-upstream: llama 2/2.")
