"""What every probe needs first: Unsloth's GPU code, or the reason it is not here."""

from __future__ import annotations

import importlib
from types import ModuleType

from .._env import (
    MODE_CPU_FALLBACK,
    MODE_IMPORT_FAILED,
    MODE_MISSING,
    MODE_NOT_IMPORTED,
    Environment,
)
from .._registry import ProbeResult, unsupported

_WHY_UNAVAILABLE = {
    MODE_MISSING: "Unsloth is not installed: the HF path needs no patch",
    MODE_IMPORT_FAILED: "`import unsloth` failed, so there is nothing to patch",
    MODE_NOT_IMPORTED: "Unsloth was not imported",
    MODE_CPU_FALLBACK: (
        "Unsloth runs in its CPU fallback mode (no GPU), which is stock transformers code; "
        "UNSLOTH_ALLOW_CPU=1 inspects its GPU code instead"
    ),
}


class Unavailable(Exception):
    """Unsloth's GPU code cannot be inspected here; ``result`` says why."""

    def __init__(self, result: ProbeResult) -> None:
        super().__init__(result.reason)
        self.result = result


def unsloth_module(env: Environment, dotted: str) -> ModuleType:
    """Import ``dotted`` (e.g. ``unsloth.models.llama``) if Unsloth's GPU code is usable here."""
    if not env.unsloth.usable:
        reason = _WHY_UNAVAILABLE.get(env.unsloth.mode, f"Unsloth mode {env.unsloth.mode}")
        if env.unsloth.mode == MODE_IMPORT_FAILED and env.unsloth.error:
            reason += f" ({env.unsloth.error})"
        raise Unavailable(unsupported(reason))
    try:
        return importlib.import_module(dotted)
    except Exception as exc:
        raise Unavailable(unsupported(f"cannot import {dotted}: {type(exc).__name__}: {exc}")) from exc


def code_mentions(function: object, *, names: tuple[str, ...] = (), text: tuple[str, ...] = ()) -> bool:
    """Whether ``function``'s compiled code uses every attribute/global in ``names`` and
    has a string constant containing each of ``text`` (nested functions included).

    Reading code objects costs microseconds; ``inspect.getsource`` on Unsloth's
    thousand-line functions costs tens of milliseconds at import time.
    """
    function = getattr(function, "__func__", function)
    codes = []
    while function is not None:  # a decorated function: look through every wrapper
        if hasattr(function, "__code__"):
            codes.append(function.__code__)
        function = getattr(function, "__wrapped__", None)
    seen_names: set[str] = set()
    strings: list[str] = []
    pending = codes
    while pending:
        current = pending.pop()
        seen_names.update(current.co_names)
        for constant in current.co_consts:
            if isinstance(constant, str):
                strings.append(constant)
            elif hasattr(constant, "co_consts"):
                pending.append(constant)
    return all(name in seen_names for name in names) and all(
        any(fragment in string for string in strings) for fragment in text
    )
