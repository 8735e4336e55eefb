"""The registry's mechanics, with stand-in patches on stand-in objects (no Unsloth)."""

from __future__ import annotations

import types

import pytest

from unsloth_qwen_compat import _env
from unsloth_qwen_compat._registry import (
    Action,
    AttributeSwaps,
    Patch,
    Shim,
    Verdict,
    native,
    needed,
)

ENV = _env.Environment("CPython", "linux", {}, None, _env.UnslothState(_env.MODE_GPU))


def _target() -> types.SimpleNamespace:
    class Base:
        def inherited(self) -> str:
            return "base"

    class Child(Base):
        def own(self) -> str:
            return "own"

    module = types.ModuleType("stand_in_unsloth")
    module.function = lambda: "original"
    return types.SimpleNamespace(module=module, Child=Child, Base=Base, table={"a": 1})


class _SwapsEverything(Patch):
    name = "swaps_everything"
    summary = "stand-in patch"

    def __init__(self, target, fail_after: int | None = None) -> None:
        self.target, self.fail_after = target, fail_after

    def probe(self, env):
        return needed("stand-in defect")

    def install(self, swaps, env):
        steps = [
            lambda: swaps.set_attr(self.target.module, "function", lambda: "patched"),
            lambda: swaps.set_attr(self.target.Child, "own", lambda self: "patched"),
            lambda: swaps.set_attr(self.target.Child, "inherited", lambda self: "patched"),
            lambda: swaps.set_item(self.target.table, "a", 2),
            lambda: swaps.set_item(self.target.table, "new", 3),
        ]
        for index, step in enumerate(steps):
            if index == self.fail_after:
                raise RuntimeError("upstream drifted")
            step()


def _snapshot(target) -> dict:
    return {
        "function": target.module.function,
        "own": target.Child.__dict__["own"],
        "child_has_inherited": "inherited" in target.Child.__dict__,
        "table": dict(target.table),
    }


def test_apply_then_revert_restores_identical_objects() -> None:
    target = _target()
    before = _snapshot(target)
    shim = Shim([_SwapsEverything(target)])
    shim.probe_all(ENV)
    shim.apply(ENV)
    assert shim.ledger["swaps_everything"].action is Action.APPLIED
    assert target.module.function() == "patched" and target.Child().inherited() == "patched"
    shim.revert()
    after = _snapshot(target)
    assert after["function"] is before["function"]
    assert after["own"] is before["own"]
    assert after["child_has_inherited"] is False  # inherited attribute not copied down
    assert after["table"] == before["table"]
    assert shim.ledger["swaps_everything"].action is Action.REVERTED


@pytest.mark.parametrize("fail_after", range(1, 5))
def test_failed_apply_leaves_nothing_half_patched(fail_after: int) -> None:
    target = _target()
    before = _snapshot(target)
    shim = Shim([_SwapsEverything(target, fail_after=fail_after)])
    shim.probe_all(ENV)
    shim.apply(ENV)
    entry = shim.ledger["swaps_everything"]
    assert entry.action is Action.FAILED and "upstream drifted" in entry.detail
    assert _snapshot(target) == before
    assert target.module.function is before["function"]
    assert shim.applied() == []


def test_apply_is_idempotent() -> None:
    target = _target()
    original = target.module.function
    shim = Shim([_SwapsEverything(target)])
    shim.probe_all(ENV)
    shim.apply(ENV)
    patched = target.module.function
    shim.apply(ENV)
    assert target.module.function is patched
    shim.revert()
    assert target.module.function is original


def test_verdicts_drive_actions() -> None:
    class Native(Patch):
        name, summary = "native_one", "stand-in"

        def probe(self, env):
            return native("upstream fixed it")

    class Unwritten(Patch):
        name, summary, implemented = "unwritten", "stand-in", False

        def probe(self, env):
            return needed("defect found")

    class Unfixable(Patch):
        name, summary = "unfixable", "stand-in"

        def probe(self, env):
            return needed("defect this release cannot fix", fixable=False)

    class Broken(Patch):
        name, summary = "broken_probe", "stand-in"

        def probe(self, env):
            raise AttributeError("no such thing")

    shim = Shim([Native(), Unwritten(), Unfixable(), Broken()])
    shim.probe_all(ENV)
    shim.apply(ENV)
    ledger = shim.ledger
    assert (ledger["native_one"].verdict, ledger["native_one"].action) == (Verdict.NATIVE, Action.SKIPPED)
    assert ledger["unwritten"].action is Action.NOT_IMPLEMENTED
    assert ledger["unwritten"].detail == "needed, not implemented yet"
    assert ledger["unfixable"].action is Action.NOT_IMPLEMENTED
    assert ledger["broken_probe"].verdict is Verdict.UNSUPPORTED
    assert "AttributeError" in ledger["broken_probe"].reason


def test_disable_marks_every_patch_disabled() -> None:
    shim = Shim([_SwapsEverything(_target())])
    shim.disable_all("UNSLOTH_QWEN_COMPAT_DISABLE is set")
    shim.apply(ENV)
    assert all(e.verdict is Verdict.DISABLED for e in shim.ledger.values())
    assert shim.applied() == []


def test_duplicate_and_unknown_names_are_errors() -> None:
    with pytest.raises(ValueError, match="two patches"):
        Shim([_SwapsEverything(_target()), _SwapsEverything(_target())])
    shim = Shim([_SwapsEverything(_target())])
    shim.probe_all(ENV)
    with pytest.raises(KeyError, match="known: swaps_everything"):
        shim.apply(ENV, ["rope_scalling"])


def test_attribute_swaps_restore_twice_is_harmless() -> None:
    target = _target()
    swaps = AttributeSwaps()
    swaps.set_attr(target.module, "added", 1)
    swaps.restore()
    swaps.restore()
    assert not hasattr(target.module, "added")
