"""The hybrid models' kernel warm-up (conformance/warm_kernels.py) and the order it relies on.

The warm-up itself needs a GPU (Triton kernels); here: which warm-ups a selection starts, how a
case waits for them (and stops waiting), and that the hybrid cases are collected last.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conformance import warm_kernels

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _a_machine_of_its_own(tmp_path_factory, monkeypatch) -> None:
    """The machine-wide locks (in the temporary folder) and the compile caches that hold the
    warm-ups' markers, of this test alone: a real run's markers on this machine would end its
    waits early."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("machine")))
    caches = tmp_path_factory.mktemp("caches")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(caches / "triton"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(caches / "inductor"))


IDS = [
    "conformance/test_forward.py::test_forward_logits[qwen3-plain-FastLanguageModel]",
    "conformance/test_forward.py::test_forward_logits[qwen3_5_moe-plain-FastLanguageModel]",
    "conformance/test_quant4.py::test_nf4_logits[qwen3_next-yarn-FastModel]",
]


def test_the_warm_up_covers_the_selected_hybrid_models_and_what_their_cases_run() -> None:
    assert warm_kernels.hybrid_models(IDS) == ["qwen3_5_moe-plain", "qwen3_next-yarn"]
    assert warm_kernels.kinds_needed(IDS, "fp32") == ["fp32", "nf4"]
    assert warm_kernels.needs(IDS[0], "fp32") == []  # not a hybrid model
    lora = "conformance/test_lora.py::test_lora_gradients[qwen3_5-plain-FastModel]"
    assert warm_kernels.needs(lora, "bf16") == ["bf16", "bf16-lora"]
    assert warm_kernels.kinds_needed([*IDS, lora], "fp32") == ["fp32", "fp32-lora", "nf4"]
    chat = "conformance/test_chat_template.py::test_chat_template[qwen3_5-plain-from_pretrained-FastModel]"
    assert warm_kernels.needs(chat, "fp32") == [] and warm_kernels.kinds_needed([chat], "fp32") == []
    assert warm_kernels.hybrid_models(IDS[:1]) == []


def test_a_selection_without_hybrid_models_starts_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("nothing to warm"))
    assert warm_kernels.start(tmp_path / "warm", IDS[:1], "fp32") == []


def _children_stood_in(monkeypatch) -> list[list[str]]:
    """The warm-up children's commands, none of them run (every zoo model buildable)."""
    started = []

    class Child:
        pid = 4242

        def __init__(self, command, **kwargs):
            started.append(command)

    monkeypatch.setattr(subprocess, "Popen", Child)
    monkeypatch.setattr("conformance.zoo.transformers_builds", lambda spec: True)
    return started


def test_start_marks_each_warm_up_pending_before_its_child_runs(tmp_path: Path, monkeypatch) -> None:
    started = _children_stood_in(monkeypatch)
    children = warm_kernels.start(tmp_path / "warm", IDS, "fp32")
    # One process per kind and hybrid family: the families compile side by side.
    assert len(children) == 4
    assert [(c[c.index("--kind") + 1], c[c.index("--models") + 1]) for c in started] == [
        ("fp32", "qwen3_5_moe-plain"),
        ("fp32", "qwen3_next-yarn"),
        ("nf4", "qwen3_5_moe-plain"),
        ("nf4", "qwen3_next-yarn"),
    ]
    assert (tmp_path / "warm" / "fp32@qwen3_5_moe.pending").read_text() == "4242"
    assert (tmp_path / "warm" / "nf4@qwen3_next.pending").read_text() == "4242"
    assert warm_kernels.lane("fp32-lora", "qwen3_5-yarn") == "fp32-lora@qwen3_5"


def _sleeper(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_a_case_waits_until_its_model_is_warm(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(warm_kernels.DIR_ENV, str(tmp_path))
    child = _sleeper(30)
    try:
        for name_of_lane in ("fp32@qwen3_5", "fp32-lora@qwen3_5", "fp32@qwen3_next"):
            (tmp_path / f"{name_of_lane}.pending").write_text(str(child.pid))
        (tmp_path / "fp32.qwen3_5-plain.ok").write_text("{}")  # the forward warm-up did this model
        assert warm_kernels.wait(["fp32"], "qwen3_5-plain", lambda line: pytest.fail(line)) < 1.0
        writer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import time, pathlib; time.sleep(1.5); pathlib.Path({str(tmp_path / 'fp32-lora@qwen3_5.done')!r}).write_text('{{}}')",
            ]
        )
        lines = []
        waited = warm_kernels.wait(["fp32", "fp32-lora"], "qwen3_5-plain", lines.append)
        writer.wait()
        assert 1.0 <= waited < 10
        assert lines == ["[warm kernels] qwen3_5-plain waits for the kernel warm-up (fp32-lora)"]
        # Another model is not warm in the forward warm-up yet: it waits (here, to the limit).
        monkeypatch.setenv(warm_kernels.WAIT_ENV, "1.2")
        assert 1.2 <= warm_kernels.wait(["fp32"], "qwen3_next-plain", lambda line: None) < 5
    finally:
        child.kill()
        child.wait()


def test_a_dead_or_unstarted_warm_up_ends_the_wait(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(warm_kernels.DIR_ENV, str(tmp_path))
    dead = _sleeper(0)
    dead.wait()
    (tmp_path / "fp32@qwen3_5.pending").write_text(str(dead.pid))  # ended without its .done
    assert warm_kernels.wait(["fp32", "nf4"], "qwen3_5-plain", lambda line: pytest.fail(line)) < 1.0


def test_without_a_warm_up_there_is_no_wait(monkeypatch) -> None:
    monkeypatch.delenv(warm_kernels.DIR_ENV, raising=False)
    assert warm_kernels.wait(["fp32"], "qwen3_5-plain", lambda line: pytest.fail(line)) == 0.0


def test_the_hybrid_cases_are_collected_last() -> None:
    """pytest-xdist hands out cases in collection order: the hybrid ones come after the rest."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "conformance", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-k", "test_forward_logits or test_nf4_logits"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "CONFORMANCE_ENTRY_POINTS": "FastLanguageModel"},
    )  # fmt: skip
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert len(ids) == 24, done.stdout[-2000:] + done.stderr[-2000:]
    hybrid = [warm_kernels.hybrid_models([nodeid]) != [] for nodeid in ids]
    assert hybrid == sorted(hybrid) and 0 < sum(hybrid) < len(ids)
    # Among them, the forward cases (forward kernels) before the NF4 ones, each by model.
    ranks = [warm_kernels.collection_rank(nodeid) for nodeid in ids]
    assert ranks == sorted(ranks) and {rank[0] for rank in ranks} == {0, 2, 3}


def test_hybrid_cases_are_ranked_by_the_warm_up_they_wait_for() -> None:
    """Two cases a worker at first, in collection order: a worker that starts on a LoRA case
    waits for the slowest warm-up and holds the cases behind it, so those come last."""
    rank = warm_kernels.collection_rank
    case = "conformance/{}::{}[{}-FastModel]".format
    assert rank(case("test_forward.py", "test_forward_logits", "qwen2-plain"))[0] == 0
    order = [
        case("test_chat_template.py", "test_chat_template", "qwen3_next-plain"),
        case("test_forward.py", "test_forward_logits", "qwen3_5-plain"),
        case("test_forward.py", "test_forward_logits", "qwen3_next-plain"),
        case("test_quant4.py", "test_nf4_logits", "qwen3_5-plain"),
        case("test_lora.py", "test_lora_gradients", "qwen3_5-plain"),
        case("test_adapter.py", "test_adapter_save_reload", "qwen3_5_moe-plain"),
    ]
    assert sorted(order, key=rank) == order and len({rank(c) for c in order}) == len(order)


def test_warm_ups_of_one_kind_take_turns_on_a_machine(tmp_path: Path, monkeypatch) -> None:
    """Two runs side by side (the retire proof) warm the same kernels: the second waits for the
    first, then finds them compiled. Here another process holds the kind's lock for 2 s."""
    import conformance.candidate  # noqa: F401  (imported before the clock starts: main() imports it)

    entered = []
    monkeypatch.setattr(
        warm_kernels, "_warm_all", lambda names, args, results: entered.append(time.monotonic())
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; h = open(sys.argv[1], 'w'); fcntl.flock(h, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(2)", str(warm_kernels.machine_lock("fp32-test"))],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    assert warm_kernels.main(["--dir", str(tmp_path), "--kind", "fp32-test", "--models", ""]) == 0
    holder.wait()
    assert entered and entered[0] - started >= 1.5  # waited for the holder to let go
    assert (tmp_path / "fp32-test.done").exists()


def test_the_report_reads_each_warm_up_state(tmp_path: Path) -> None:
    """Ended (with its seconds), running, or died (with the end of its log), and the models
    warmed so far: what a stopped run's report says about its kernel warm-ups."""
    import json

    ended, died = _sleeper(0), _sleeper(0)
    ended.wait()
    died.wait()
    running = _sleeper(30)
    try:
        (tmp_path / "nf4@qwen3_5.pending").write_text(str(ended.pid))
        (tmp_path / "nf4@qwen3_5.done").write_text(json.dumps({"kind": "nf4", "seconds": 12.5, "models": []}))
        (tmp_path / "fp32@qwen3_5.pending").write_text(str(running.pid))
        for model in ("qwen3_5-plain", "qwen3_5_moe-plain"):  # the second is another lane's
            (tmp_path / f"fp32.{model}.ok").write_text(json.dumps({"model": model, "seconds": 7.0}))
        (tmp_path / "fp32-lora@qwen3_5.pending").write_text(str(died.pid))
        (tmp_path / "fp32-lora@qwen3_5.log").write_text("compiling\nTraceback\nRuntimeError: boom\n")
        state = warm_kernels.state(tmp_path)
    finally:
        running.kill()
    assert state["nf4@qwen3_5"]["state"] == "ended in 12.5 s"
    assert state["fp32@qwen3_5"]["state"] == "running"
    assert state["fp32@qwen3_5"]["models"] == [{"model": "qwen3_5-plain", "seconds": 7.0}]
    assert state["fp32-lora@qwen3_5"]["state"] == "died"
    assert state["fp32-lora@qwen3_5"]["log_tail"][-1] == "RuntimeError: boom"


def test_a_case_need_not_wait_for_its_own_turn_once_another_run_warmed_its_model(
    tmp_path: Path, monkeypatch
) -> None:
    """Runs side by side take turns to warm a kind: the run whose turn has not come finds the
    kernels another run compiled into the shared caches (their markers) and goes on."""
    session = tmp_path / "session"
    session.mkdir()
    monkeypatch.setenv(warm_kernels.DIR_ENV, str(session))
    waiting_for_turn = _sleeper(30)
    try:
        for name_of_lane in ("fp32@qwen3_5", "fp32@qwen3_next"):
            (session / f"{name_of_lane}.pending").write_text(str(waiting_for_turn.pid))
        assert warm_kernels._pending(session, "fp32", "qwen3_5-plain")
        warm_kernels._mark_warm("fp32", "qwen3_5-plain", {})
        assert not warm_kernels._pending(session, "fp32", "qwen3_5-plain")
        assert warm_kernels._pending(session, "fp32", "qwen3_next-plain")  # another model still waits
        # Other caches are other kernels: their markers do not count.
        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "other-triton"))
        assert warm_kernels._pending(session, "fp32", "qwen3_5-plain")
    finally:
        waiting_for_turn.kill()


def test_the_markers_live_and_go_with_both_caches(tmp_path: Path, monkeypatch) -> None:
    """A marker in each cache the warm-up filled: deleting either cache (on an H200 the Triton
    cache was deleted and unpacked again from an older pack between two runs, markers kept
    elsewhere still said warm, and every case compiled for itself, about 240 s a case) takes
    the warm state with it; unpacking a pack that holds them brings it back."""
    warm_kernels._mark_warm("nf4", "qwen3_next-yarn", {"seconds": 3.0})
    markers = warm_kernels.cache_markers("nf4", "qwen3_next-yarn")
    assert [m.parent.parent for m in markers] == [
        Path(os.environ["TRITON_CACHE_DIR"]),
        Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]),
    ]
    assert warm_kernels.warm_in_cache("nf4", "qwen3_next-yarn")
    assert not warm_kernels.warm_in_cache("fp32", "qwen3_next-yarn")  # another kind
    shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"])  # /tmp cleared, Triton's cache kept
    assert not warm_kernels.warm_in_cache("nf4", "qwen3_next-yarn")
    # Keyed by what compiled kernels are good for: another torch is another key.
    key = warm_kernels.stack_key()
    monkeypatch.setattr(warm_kernels, "stack_key", lambda: "another-stack")
    assert key not in warm_kernels.cache_markers("nf4", "qwen3_next-yarn")[0].name


def test_warm_ups_the_caches_hold_are_not_started(tmp_path: Path, monkeypatch) -> None:
    """A session whose caches hold a lane's every model starts no process for it (the report
    says so), and starts the rest with only the models still cold."""
    started = _children_stood_in(monkeypatch)
    ids = [*IDS, "conformance/test_forward.py::test_forward_logits[qwen3_5_moe-yarn-FastModel]"]
    for model in ("qwen3_5_moe-plain", "qwen3_5_moe-yarn"):
        warm_kernels._mark_warm("fp32", model, {})
    warm_kernels._mark_warm("nf4", "qwen3_next-yarn", {})
    warm_kernels.start(tmp_path / "warm", ids, "fp32")
    assert [(c[c.index("--kind") + 1], c[c.index("--models") + 1]) for c in started] == [
        ("fp32", "qwen3_next-yarn"),
        ("nf4", "qwen3_5_moe-plain,qwen3_5_moe-yarn"),
    ]
    state = warm_kernels.state(tmp_path / "warm")
    assert state["fp32@qwen3_5_moe"]["state"] == (
        "not run: the compile caches already held it (qwen3_5_moe-plain, qwen3_5_moe-yarn)"
    )
    assert state["nf4@qwen3_next"]["state"].startswith("not run")
    monkeypatch.setenv(warm_kernels.DIR_ENV, str(tmp_path / "warm"))
    assert warm_kernels.wait(["fp32"], "qwen3_5_moe-yarn", lambda line: pytest.fail(line)) < 1.0


def test_with_every_warm_up_in_the_caches_the_longest_cases_go_first(monkeypatch) -> None:
    """Nothing to wait for: the cases go longest first (the hybrid LoRA cases among the first),
    so the leg does not end on one worker's long case; until then, the hybrid ones last."""
    monkeypatch.setattr("conformance.zoo.transformers_builds", lambda spec: True)
    case = "conformance/{}::{}[{}-FastModel]".format
    lora = case("test_lora.py", "test_lora_gradients", "qwen3_5-plain")
    forward = case("test_forward.py", "test_forward_logits", "qwen2-plain")
    chat = case("test_chat_template.py", "test_chat_template", "qwen3_next-plain")
    assert sorted([forward, chat, lora], key=lambda c: warm_kernels.collection_rank(c, True)) == [
        lora,
        chat,
        forward,
    ]
    assert sorted([lora, chat, forward], key=warm_kernels.collection_rank) == [forward, chat, lora]
    assert not warm_kernels.all_warm("fp32")
    for kind in ("fp32", "fp32-lora", "nf4"):
        for spec in warm_kernels_zoo_hybrids():
            warm_kernels._mark_warm(kind, spec, {})
    assert warm_kernels.all_warm("fp32") and not warm_kernels.all_warm("bf16")


def warm_kernels_zoo_hybrids() -> list[str]:
    from conformance import zoo

    return [spec.name for spec in zoo.ZOO if spec.hybrid]


def test_a_warm_up_marks_each_model_it_warmed_in_the_caches(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(warm_kernels, "_warm_one", lambda name, kind: {"model": name, "seconds": 1.0})
    args = type("Args", (), {"dir": tmp_path, "kind": "fp32"})()
    warm_kernels._warm_all(["qwen3_5-plain"], args, [])
    assert warm_kernels.warm_in_cache("fp32", "qwen3_5-plain")

    def broken(name, kind):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(warm_kernels, "_warm_one", broken)
    warm_kernels._warm_all(["qwen3_next-plain"], args, [])
    assert not warm_kernels.warm_in_cache("fp32", "qwen3_next-plain")  # failed: not warm
