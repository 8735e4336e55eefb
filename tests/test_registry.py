"""The registry's mechanics, with stand-in patches on stand-in objects (no Unsloth)."""

from __future__ import annotations

import sys
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
from unsloth_qwen_compat.patches import all_patches

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

    def probe(self, module, env):
        return needed("stand-in defect")

    def install(self, swaps, module, env):
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

        def probe(self, module, env):
            return native("upstream fixed it")

    class Unwritten(Patch):
        name, summary, implemented = "unwritten", "stand-in", False

        def probe(self, module, env):
            return needed("defect found")

    class Unfixable(Patch):
        name, summary = "unfixable", "stand-in"

        def probe(self, module, env):
            return needed("defect this release cannot fix", fixable=False)

    class Broken(Patch):
        name, summary = "broken_probe", "stand-in"

        def probe(self, module, env):
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


# -- the declared Unsloth module --------------------------------------------------------


class _ReadsModule(Patch):
    """Declares a stand-in Unsloth module and records what probe and install were given."""

    name, summary = "reads_module", "stand-in"
    unsloth_module = "stand_in_unsloth.models"

    def __init__(self) -> None:
        self.given: dict[str, object] = {}

    def probe(self, module, env):
        self.given["probe"] = module
        return needed("stand-in defect")

    def install(self, swaps, module, env):
        self.given["install"] = module
        swaps.set_attr(module, "patched", True)


def test_the_declared_module_is_imported_once_and_handed_to_probe_and_install(monkeypatch) -> None:
    module = types.ModuleType("stand_in_unsloth.models")
    monkeypatch.setitem(sys.modules, "stand_in_unsloth.models", module)
    patch = _ReadsModule()
    shim = Shim([patch])
    shim.probe_all(ENV)
    monkeypatch.delitem(sys.modules, "stand_in_unsloth.models")  # install must not import again
    shim.apply(ENV)
    assert patch.given == {"probe": module, "install": module}
    assert shim.ledger["reads_module"].action is Action.APPLIED and module.patched is True
    shim.revert()
    assert not hasattr(module, "patched")


@pytest.mark.parametrize(
    ("mode", "error", "reason"),
    [
        (_env.MODE_MISSING, None, "Unsloth is not installed: the HF path needs no patch"),
        (_env.MODE_IMPORT_FAILED, "RuntimeError: CUDA driver too old", "`import unsloth` failed"),
        (_env.MODE_NOT_IMPORTED, None, "Unsloth was not imported"),
        (_env.MODE_CPU_FALLBACK, None, "CPU fallback mode"),
    ],
)
def test_without_usable_unsloth_the_probe_never_runs(mode, error, reason) -> None:
    env = _env.Environment("CPython", "linux", {}, None, _env.UnslothState(mode, error))
    patch = _ReadsModule()
    shim = Shim([patch])
    shim.probe_all(env)
    shim.apply(env)
    entry = shim.ledger["reads_module"]
    assert (entry.verdict, entry.action) == (Verdict.UNSUPPORTED, Action.SKIPPED)
    assert reason in entry.reason and (error or "") in entry.reason
    assert patch.given == {}


def test_a_declared_module_that_does_not_import_is_unsupported() -> None:
    patch = _ReadsModule()
    shim = Shim([patch])
    shim.probe_all(ENV)
    assert shim.ledger["reads_module"].verdict is Verdict.UNSUPPORTED
    assert shim.ledger["reads_module"].reason.startswith(
        "cannot import stand_in_unsloth.models: ModuleNotFoundError"
    )
    assert patch.given == {}


def test_every_patch_declares_an_unsloth_module() -> None:
    missing = _env.Environment("CPython", "linux", {}, None, _env.UnslothState(_env.MODE_MISSING))
    patches = all_patches()
    assert all(p.unsloth_module and p.unsloth_module.startswith("unsloth.") for p in patches)
    ledger = Shim(patches).probe_all(missing)
    assert {e.reason for e in ledger.values()} == {"Unsloth is not installed: the HF path needs no patch"}
