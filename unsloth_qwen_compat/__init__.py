"""unsloth-qwen-compat: import before training to make the installed Unsloth right for Qwen.

On import this module imports Unsloth, probes what the installed release does for
Qwen2 / Qwen2.5 / Qwen3 / Qwen3-MoE, and patches only what is missing or wrong. It
never raises because Unsloth is absent, broken or without a GPU: it records why in the
ledger (:func:`status`) and leaves the plain Hugging Face path usable.
``UNSLOTH_QWEN_COMPAT_DISABLE=1`` (or ``true``/``yes``/``on``) turns every patch off
(stock Unsloth).

The one exception is the package's own command line (``python -m unsloth_qwen_compat``,
``unsloth-qwen-compat``): it does this work once its arguments are parsed, so ``--help``
and usage errors answer without importing Unsloth.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
import time
from typing import Any

from . import _env
from ._matrix import LEGS, matching_leg, newest_tested_unsloth
from ._registry import Action, LedgerEntry, PatchError, Shim, UnsupportedConfigurationError, Verdict
from ._version import __version__
from ._warnings import UnslothQwenCompatWarning, warn
from .patches import all_patches

DISABLE_VARIABLE = "UNSLOTH_QWEN_COMPAT_DISABLE"


def _disabled() -> bool:
    return _env.switch(DISABLE_VARIABLE)


def _import_unsloth() -> tuple[_env.UnslothState, _env.GpuInfo | None]:
    try:
        spec = importlib.util.find_spec("unsloth")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return _env.UnslothState(_env.MODE_MISSING), _env.detect_gpu()
    try:
        # Unsloth prints banners while importing; keep stdout for the caller's own output
        # (``status --json`` must hold nothing but JSON).
        with contextlib.redirect_stdout(sys.stderr):
            module = importlib.import_module("unsloth")
    except Exception as exc:  # a broken Unsloth must not break the HF path
        return _env.UnslothState(
            _env.MODE_IMPORT_FAILED, error=f"{type(exc).__name__}: {exc}"
        ), _env.detect_gpu()
    gpu = _env.detect_gpu()  # after Unsloth, which has imported torch and set up CUDA anyway
    return _env.UnslothState(_env.unsloth_mode_after_import(module, gpu), module=module), gpu


class _State:
    """Everything the import decided, kept for :func:`status`."""

    def __init__(self) -> None:
        started = time.perf_counter()
        transformers_first = "transformers" in sys.modules and "unsloth" not in sys.modules
        unsloth_state, gpu = _import_unsloth()
        self.unsloth_import_seconds = time.perf_counter() - started
        self.env = _env.Environment(
            python=_env.describe_python(),
            platform=sys.platform,
            versions=_env.read_versions(),
            gpu=gpu,
            unsloth=unsloth_state,
            transformers_imported_first=transformers_first,
        )
        self.leg = matching_leg(self.env)
        self.notes: list[str] = []
        self.shim = Shim(all_patches())
        probe_started = time.perf_counter()
        if _disabled():
            self.shim.disable_all(f"{DISABLE_VARIABLE} is on")
        else:
            self.shim.probe_all(self.env)
            self.shim.apply(self.env)  # applies only `needed` verdicts, which need usable Unsloth
        self.shim_seconds = time.perf_counter() - probe_started
        self._note_and_warn()

    def _note_and_warn(self) -> None:
        env, problems = self.env, []
        if env.unsloth.mode == _env.MODE_IMPORT_FAILED:
            problems.append(f"`import unsloth` failed ({env.unsloth.error}); only the HF path works")
        if env.transformers_imported_first:
            loaded = sorted(m for m in sys.modules if m.startswith("transformers.models.qwen"))
            self.notes.append(
                "transformers was imported before Unsloth: Unsloth's import-time patches do not "
                "reach model classes already loaded"
                + (f" ({', '.join(loaded)})" if loaded else "")
                + " and Unsloth warns; import unsloth_qwen_compat first. "
                "The shim's own patches are unaffected (they patch Unsloth, not transformers)."
            )
            if loaded:
                problems.append(self.notes[-1])
        unsloth_version = env.version("unsloth")
        if unsloth_version is not None and env.unsloth.usable and self.leg is None:
            newer = _env.release_of(unsloth_version) > newest_tested_unsloth()
            self.notes.append(
                f"unsloth {unsloth_version} + transformers {env.versions.get('transformers')} is "
                "outside the tested matrix"
                + (
                    " (newer than every tested leg: only probe-confirmed patches are applied)"
                    if newer
                    else ""
                )
                + "; run `python -m unsloth_qwen_compat doctor` for the tested pins"
            )
            problems.append(self.notes[-1])
        if env.prerelease:
            self.notes.append(f"pre-release builds installed: {', '.join(env.prerelease)}")
        for entry in self.shim.ledger.values():
            if entry.action is Action.FAILED:
                problems.append(f"patch {entry.name} failed: {entry.detail}")
            elif entry.action is Action.NOT_IMPLEMENTED and not self.shim.patches[entry.name].speed_only:
                problems.append(f"{entry.name} is needed ({entry.reason}) but not fixed by this release")
            elif entry.action is Action.SWITCHED_OFF:  # the user's choice: a note, not a warning
                self.notes.append(f"{entry.name} {entry.detail}")
        if problems:
            warn("unsloth_qwen_compat: " + "; ".join(problems))

    def verdict_line(self) -> str:
        ledger = self.shim.ledger.values()
        if all(e.verdict is Verdict.DISABLED for e in ledger):
            return f"shim disabled ({DISABLE_VARIABLE} is on): stock Unsloth"
        if not self.env.unsloth.usable:
            return f"nothing to patch: Unsloth {self.env.unsloth.mode}"
        needed = [e.name for e in ledger if e.verdict is Verdict.NEEDED]
        if needed:
            return "shim needed for: " + ", ".join(needed)
        if all(e.verdict is Verdict.NATIVE for e in ledger):
            return "everything is native: the shim can be retired"
        return "nothing needed, but some patches could not be judged (see unsupported)"


def _started_as_own_command_line() -> bool:
    """True when this import is the package's command line starting, before it parsed anything.

    ``python -m unsloth_qwen_compat`` imports this package before it runs ``__main__``:
    meanwhile ``sys.argv[0]`` is ``"-m"`` and the module name (alone, or ending a cluster
    such as ``-Im<name>``) is the item of ``sys.orig_argv`` just before the arguments. The
    ``unsloth-qwen-compat`` script (``-script.py`` / ``.exe`` on Windows) imports it to
    reach ``cli.main``. Any other program importing the package gets the import-time work.
    """
    argv = getattr(sys, "argv", None) or [""]
    if argv[0] == "-m":
        original = getattr(sys, "orig_argv", [])
        item = original[-len(argv)] if len(original) > len(argv) else ""
        module = item.split("m", 1)[-1] if item.startswith("-") else item
        return module in (__name__, f"{__name__}.__main__")
    script = re.sub(r"(-script\.pyw?|\.exe)$", "", os.path.basename(argv[0]))
    return script == "unsloth-qwen-compat"


_state: _State | None = None


def _current() -> _State:
    """What the import-time work found and did; done now if the command line deferred it."""
    global _state
    if _state is None:
        _state = _State()
    return _state


if not _started_as_own_command_line():
    _current()


def status() -> dict[str, Any]:
    """The ledger: versions, GPU, Unsloth's mode, each patch's verdict and action, notes."""
    state = _current()
    return {
        "unsloth_qwen_compat": __version__,
        "environment": state.env.as_dict(),
        "tested_leg": None if state.leg is None else state.leg.name,
        "patches": [entry.as_dict() for entry in state.shim.ledger.values()],
        "verdict": state.verdict_line(),
        "notes": list(state.notes),
        "timings": {
            "unsloth_import_s": round(state.unsloth_import_seconds, 4),
            "shim_s": round(state.shim_seconds, 4),
        },
    }


def environment() -> _env.Environment:
    return _current().env


def apply(names: list[str] | None = None) -> dict[str, LedgerEntry]:
    """Apply needed patches (all, or ``names``) again after :func:`revert`. Idempotent."""
    state = _current()
    if _disabled():
        return state.shim.ledger
    for entry in state.shim.ledger.values():
        if entry.action is Action.REVERTED:
            entry.action = Action.PENDING
    return state.shim.apply(state.env, names)


def revert(names: list[str] | None = None) -> None:
    """Restore exactly what the applied patches (all, or ``names``) replaced."""
    _current().shim.revert(names)


def shim() -> Shim:
    """The live registry (for tests and tooling)."""
    return _current().shim


__all__ = [
    "LEGS",
    "Action",
    "LedgerEntry",
    "PatchError",
    "UnsupportedConfigurationError",
    "UnslothQwenCompatWarning",
    "Verdict",
    "__version__",
    "apply",
    "environment",
    "revert",
    "shim",
    "status",
]
