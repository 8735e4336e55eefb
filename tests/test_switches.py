"""Every on/off environment variable the shim reads, through its one parser."""

from __future__ import annotations

import warnings

import pytest

import unsloth_qwen_compat
from unsloth_qwen_compat import UnslothQwenCompatWarning, _env
from unsloth_qwen_compat._registry import Action, Patch, Shim, needed

VARIABLE = "UNSLOTH_QWEN_COMPAT_TEST_SWITCH"

#: (value, what switch() reads) for every spelling it accepts; "" and unset give the default.
ACCEPTED = [
    *[(value, True) for value in ("1", "true", "TRUE", "True", "yes", "Yes", "on", "ON", " 1 ", "\ton\n")],
    *[(value, False) for value in ("0", "false", "False", "no", "NO", "off", "Off", " 0", "off ")],
]
REJECTED = ["2", "enable", "y", "n", "-1", "true!", "o n", "disabled"]


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_env, "_warned_switches", set())


@pytest.mark.parametrize(("value", "expected"), ACCEPTED)
@pytest.mark.parametrize("default", [False, True])
def test_accepted_values_read_the_same_whatever_the_default(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool, default: bool
) -> None:
    monkeypatch.setenv(VARIABLE, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _env.switch(VARIABLE, default) is expected


@pytest.mark.parametrize("value", [None, "", "   "])
@pytest.mark.parametrize("default", [False, True])
def test_unset_or_empty_is_the_default(
    monkeypatch: pytest.MonkeyPatch, value: str | None, default: bool
) -> None:
    if value is None:
        monkeypatch.delenv(VARIABLE, raising=False)
    else:
        monkeypatch.setenv(VARIABLE, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _env.switch(VARIABLE, default) is default


@pytest.mark.parametrize("value", REJECTED)
@pytest.mark.parametrize("default", [False, True])
def test_other_values_warn_once_and_give_the_default(
    monkeypatch: pytest.MonkeyPatch, value: str, default: bool
) -> None:
    monkeypatch.setenv(VARIABLE, value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _env.switch(VARIABLE, default) is default
        assert _env.switch(VARIABLE, default) is default
    assert len(caught) == 1 and caught[0].category is UnslothQwenCompatWarning
    message = str(caught[0].message)
    assert f"{VARIABLE}={value!r}" in message
    assert "1/true/yes/on" in message and "0/false/no/off" in message
    assert f"using the default ({'on' if default else 'off'})" in message
    assert caught[0].filename == __file__  # the caller's line, not the package's


#: Unsloth's own variables are read as Unsloth reads them: on only for exactly "1".
@pytest.mark.parametrize(
    ("value", "expected", "warns"),
    [("1", True, False), ("0", False, False), ("", False, False), ("true", False, True), (" 1", False, True)],
)
def test_unsloth_variables_read_as_unsloth_does(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: bool, warns: bool
) -> None:
    monkeypatch.setenv("UNSLOTH_FORCE_FUSED_LORA", value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _env.unsloth_switch("UNSLOTH_FORCE_FUSED_LORA") is expected
    assert len(caught) == int(warns)
    if warns:
        assert "only for the exact value '1'" in str(caught[0].message)


@pytest.mark.parametrize(
    ("value", "disabled"),
    [("1", True), ("on", True), (" Yes", True), ("off", False), ("0", False), ("", False), ("FALSE", False)],
)
def test_disable_variable(monkeypatch: pytest.MonkeyPatch, value: str, disabled: bool) -> None:
    monkeypatch.setenv(unsloth_qwen_compat.DISABLE_VARIABLE, value)
    assert unsloth_qwen_compat._disabled() is disabled


class _OptIn(Patch):
    name, summary = "opt_in", "stand-in speed patch"
    opt_in_env = "UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS"

    def probe(self, module, env):
        return needed("stand-in defect")

    def install(self, swaps, module, env):
        pass


@pytest.mark.parametrize(
    ("value", "action"),
    [
        ("1", Action.APPLIED),
        ("true", Action.APPLIED),
        ("ON", Action.APPLIED),
        ("0", Action.OPT_IN),
        ("off", Action.OPT_IN),
        ("", Action.OPT_IN),
        ("fused", Action.OPT_IN),
    ],
)
def test_opt_in_variable(monkeypatch: pytest.MonkeyPatch, value: str, action: Action) -> None:
    monkeypatch.setenv(_OptIn.opt_in_env, value)
    env = _env.Environment("CPython", "linux", {}, None, _env.UnslothState(_env.MODE_GPU))
    shim = Shim([_OptIn()])
    shim.probe_all(env)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shim.apply(env)
    assert shim.ledger["opt_in"].action is action
    assert len(caught) == (value == "fused")


class _OnByDefault(Patch):
    name, summary = "on_by_default", "stand-in speed patch with an off switch"
    off_env = "UNSLOTH_QWEN_COMPAT_TEST_OFF_SWITCH"

    def __init__(self) -> None:
        self.installed = 0

    def probe(self, module, env):
        return needed("stand-in defect")

    def install(self, swaps, module, env):
        self.installed += 1


@pytest.mark.parametrize(
    ("value", "action"),
    [
        (None, Action.APPLIED),
        ("", Action.APPLIED),
        ("1", Action.APPLIED),
        ("Yes", Action.APPLIED),
        ("0", Action.SWITCHED_OFF),
        ("false", Action.SWITCHED_OFF),
        ("NO", Action.SWITCHED_OFF),
        (" Off ", Action.SWITCHED_OFF),
        ("disabled", Action.APPLIED),  # not an on/off value: a warning, and the default (on)
    ],
)
def test_off_switch_variable(monkeypatch: pytest.MonkeyPatch, value: str | None, action: Action) -> None:
    if value is None:
        monkeypatch.delenv(_OnByDefault.off_env, raising=False)
    else:
        monkeypatch.setenv(_OnByDefault.off_env, value)
    env = _env.Environment("CPython", "linux", {}, None, _env.UnslothState(_env.MODE_GPU))
    patch = _OnByDefault()
    shim = Shim([patch])
    shim.probe_all(env)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shim.apply(env)
    entry = shim.ledger["on_by_default"]
    assert entry.action is action
    assert patch.installed == (action is Action.APPLIED)
    if action is Action.SWITCHED_OFF:
        assert shim.applied() == []
        assert entry.detail == (
            f"switched off by {_OnByDefault.off_env}={value.strip()}: unset it (or set it to 1) to apply"
        )
    assert len(caught) == (value == "disabled")
    if caught:
        message = str(caught[0].message)
        assert f"{_OnByDefault.off_env}='disabled' is not an on/off value" in message
        assert "using the default (on)" in message


def test_the_fused_qkv_patch_is_on_by_default_with_an_off_switch() -> None:
    from unsloth_qwen_compat.patches.qwen2_fused_qkv_bias import Qwen2FusedQkvBias

    assert Qwen2FusedQkvBias.opt_in_env is None
    assert Qwen2FusedQkvBias.off_env == "UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS"
