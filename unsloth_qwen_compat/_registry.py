"""The patch contract: probe -> verdict, all-or-nothing apply, exact revert, a ledger.

A patch never edits files. Every change it makes goes through :class:`AttributeSwaps`,
which remembers what stood there before, so that a failure half-way through and an
explicit :meth:`Shim.revert` both put back the very same objects (``is``-identical).

A patch declares the Unsloth module it works on (:attr:`Patch.unsloth_module`); the
:class:`Shim` imports it once, hands it to the patch's probe and install, and turns
"Unsloth's GPU code is not here" into an ``unsupported`` verdict before the probe runs.
"""

from __future__ import annotations

import abc
import enum
import importlib
import logging
import os
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any, ClassVar

from ._env import (
    MODE_CPU_FALLBACK,
    MODE_IMPORT_FAILED,
    MODE_MISSING,
    MODE_NOT_IMPORTED,
    Environment,
    switch,
)

logger = logging.getLogger("unsloth_qwen_compat")


class Verdict(str, enum.Enum):
    NEEDED = "needed"  # the installed Unsloth lacks this or gets it wrong
    NATIVE = "native"  # upstream already does it right: the patch stays out
    UNSUPPORTED = "unsupported"  # cannot be judged or applied here (no Unsloth, CPU mode, ...)
    DISABLED = "disabled"  # UNSLOTH_QWEN_COMPAT_DISABLE is on


class Action(str, enum.Enum):
    PENDING = "pending"  # probed, nothing done yet
    APPLIED = "applied"
    SKIPPED = "skipped"  # verdict says there is nothing to do
    NOT_IMPLEMENTED = "not implemented"  # needed, but this release has no patch body yet
    OPT_IN = "opt-in"  # needed, written, but off unless its environment variable is set
    SWITCHED_OFF = "switched off"  # needed, on by default, turned off by its environment variable
    # Status without a GPU: a child that inspected Unsloth's GPU code applied it, so a GPU
    # run of this install applies it; the process itself patched nothing.
    WOULD_APPLY = "would apply"
    FAILED = "failed"  # apply raised; everything it had changed was restored
    REVERTED = "reverted"


@dataclass(frozen=True)
class ProbeResult:
    verdict: Verdict
    reason: str
    #: False when the defect found is one this release cannot fix yet (reported, not patched).
    fixable: bool = True


def needed(reason: str, *, fixable: bool = True) -> ProbeResult:
    return ProbeResult(Verdict.NEEDED, reason, fixable)


def native(reason: str) -> ProbeResult:
    return ProbeResult(Verdict.NATIVE, reason)


def unsupported(reason: str) -> ProbeResult:
    return ProbeResult(Verdict.UNSUPPORTED, reason)


class PatchError(RuntimeError):
    """A patch could not be applied; nothing it touched stays changed."""


class UnsupportedConfigurationError(NotImplementedError):
    """The installed Unsloth cannot train this configuration right, so the shim refuses it.

    Raised instead of letting upstream train wrong or fail obscurely; the message says
    what to do instead (another path, setting or Unsloth version).
    """


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


def import_unsloth(env: Environment, dotted: str) -> ModuleType:
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


_MISSING = object()


class AttributeSwaps:
    """Records replaced attributes and mapping items so they can be put back exactly.

    Only what was in the owner's own ``__dict__`` counts as "there before": an
    attribute a class merely inherits is removed again on restore, not copied down.
    """

    def __init__(self) -> None:
        self._undo: list[tuple[str, Any, Any, Any]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def set_attr(self, owner: Any, name: str, value: Any) -> None:
        original = vars(owner).get(name, _MISSING) if hasattr(owner, "__dict__") else _MISSING
        setattr(owner, name, value)
        self._undo.append(("attr", owner, name, original))

    def wrap_staticmethod(self, owner: type, name: str, wrap: Callable[[Any], Any]) -> None:
        """Replace ``owner``'s own static method ``name`` by ``wrap(its function)``, still static."""
        current = vars(owner)[name]
        function = current.__func__ if isinstance(current, staticmethod) else current
        self.set_attr(owner, name, staticmethod(wrap(function)))

    def set_item(self, mapping: MutableMapping[Any, Any], key: Any, value: Any) -> None:
        original = mapping.get(key, _MISSING)
        mapping[key] = value
        self._undo.append(("item", mapping, key, original))

    def targets(self) -> list[tuple[Any, Any]]:
        """(owner, name-or-key) of everything changed, in the order it was changed."""
        return [(owner, name) for _, owner, name, _ in self._undo]

    def restore(self) -> None:
        """Undo every change, newest first. Safe to call twice."""
        while self._undo:
            kind, owner, name, original = self._undo.pop()
            if kind == "attr":
                if original is _MISSING:
                    if name in vars(owner):
                        delattr(owner, name)
                else:
                    setattr(owner, name, original)
            elif original is _MISSING:
                owner.pop(name, None)
            else:
                owner[name] = original


class Patch(abc.ABC):
    """One fix for one defect of some Unsloth versions.

    Subclasses set ``name``, ``summary`` and ``unsloth_module``, decide with :meth:`probe`
    from what the installed code does (the version number is at most a hint, so a backport
    is never patched twice) and make their changes in :meth:`install` through ``swaps`` only.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    #: The Unsloth module the patch inspects and changes (e.g. ``unsloth.models.llama``). The
    #: Shim imports it and passes it to :meth:`probe` and :meth:`install`; where Unsloth's GPU
    #: code is not usable the verdict is ``unsupported`` and the probe does not run.
    #: None: the patch needs no Unsloth module and gets None.
    unsloth_module: ClassVar[str | None] = None
    #: False for a slot whose probe is real but whose patch body is not written yet.
    implemented: ClassVar[bool] = True
    #: True for a patch that only makes training faster: leaving it unapplied is not warned about.
    speed_only: ClassVar[bool] = False
    #: An environment switch that must be on (``1``, ``true``...: :func:`._env.switch`) for the
    #: patch to apply (None: on by default, unless :attr:`off_env` turns it off).
    #: For a patch not yet on by default (e.g. a speed patch until its conformance cases pass
    #: with it on every leg): it stays out unless asked for; status says ``opt-in``.
    opt_in_env: ClassVar[str | None] = None
    #: An environment switch that turns an on-by-default patch off (``0``, ``false``...:
    #: :func:`._env.switch`; unset or empty: on; any other value warns and counts as on).
    #: For a patch on by default that a user may still want out (e.g. a speed patch once its
    #: conformance cases pass with it on): status then says ``switched off`` and how to undo it.
    off_env: ClassVar[str | None] = None
    #: Conformance case names (prefixes) that measure this defect, for upstream reports.
    conformance_cases: ClassVar[tuple[str, ...]] = ()
    #: A minimal reproduction, as Python, for an upstream issue.
    reproduction: ClassVar[str] = ""

    @abc.abstractmethod
    def probe(self, module: ModuleType | None, env: Environment) -> ProbeResult:
        """The verdict on this install; ``module`` is the imported :attr:`unsloth_module`."""

    def install(self, swaps: AttributeSwaps, module: ModuleType | None, env: Environment) -> None:
        raise NotImplementedError(f"{self.name}: no patch body in this release")


@dataclass
class LedgerEntry:
    name: str
    summary: str
    verdict: Verdict
    reason: str
    action: Action = Action.PENDING
    detail: str = ""
    fixable: bool = True

    def as_dict(self) -> dict[str, str]:
        out = asdict(self)
        out["verdict"] = self.verdict.value
        out["action"] = self.action.value
        return out


class Shim:
    """Runs the patches: probe each once, apply the needed ones, revert on request."""

    def __init__(self, patches: Iterable[Patch]) -> None:
        self.patches: dict[str, Patch] = {}
        for patch in patches:
            if patch.name in self.patches:
                raise ValueError(f"two patches are named {patch.name!r}")
            self.patches[patch.name] = patch
        self.ledger: dict[str, LedgerEntry] = {}
        self._swaps: dict[str, AttributeSwaps] = {}
        #: Each probed patch's imported ``unsloth_module``, handed to its install.
        self._modules: dict[str, ModuleType | None] = {}

    # -- probing -------------------------------------------------------------------
    def _probe(self, patch: Patch, env: Environment) -> ProbeResult:
        module = None
        if patch.unsloth_module is not None:
            try:
                module = import_unsloth(env, patch.unsloth_module)
            except Unavailable as why:
                return why.result
        self._modules[patch.name] = module
        return patch.probe(module, env)

    def probe_all(self, env: Environment) -> dict[str, LedgerEntry]:
        for patch in self.patches.values():
            try:
                result = self._probe(patch, env)
            except Exception as exc:  # a probe bug must not break `import`
                result = unsupported(f"probe raised {type(exc).__name__}: {exc}")
            self.ledger[patch.name] = LedgerEntry(
                patch.name, patch.summary, result.verdict, result.reason, fixable=result.fixable
            )
        return self.ledger

    def disable_all(self, reason: str) -> dict[str, LedgerEntry]:
        for patch in self.patches.values():
            self.ledger[patch.name] = LedgerEntry(
                patch.name, patch.summary, Verdict.DISABLED, reason, Action.SKIPPED
            )
        return self.ledger

    # -- applying ------------------------------------------------------------------
    def apply(self, env: Environment, names: Iterable[str] | None = None) -> dict[str, LedgerEntry]:
        """Apply every patch whose verdict is ``needed`` (or only ``names``). Idempotent."""
        selected = list(self.patches) if names is None else list(names)
        for name in selected:
            if name not in self.patches:
                raise KeyError(f"unknown patch {name!r}; known: {', '.join(self.patches)}")
            entry = self.ledger.get(name)
            if entry is None:
                raise RuntimeError("probe_all() must run before apply()")
            if name in self._swaps:  # already applied: nothing to do
                continue
            if entry.verdict is not Verdict.NEEDED:
                entry.action = Action.SKIPPED
                continue
            patch = self.patches[name]
            if not (patch.implemented and entry.fixable):
                entry.action = Action.NOT_IMPLEMENTED
                entry.detail = "needed, not implemented yet"
                continue
            if patch.opt_in_env and not switch(patch.opt_in_env):
                entry.action = Action.OPT_IN
                entry.detail = f"off by default: set {patch.opt_in_env}=1 to apply"
                continue
            if patch.off_env and not switch(patch.off_env, default=True):
                entry.action = Action.SWITCHED_OFF
                value = os.environ.get(patch.off_env, "").strip()
                entry.detail = f"switched off by {patch.off_env}={value}: unset it (or set it to 1) to apply"
                continue
            swaps = AttributeSwaps()
            try:
                patch.install(swaps, self._modules[name], env)
            except Exception as exc:
                swaps.restore()
                entry.action = Action.FAILED
                entry.detail = f"{type(exc).__name__}: {exc} (all changes restored)"
                logger.warning("unsloth_qwen_compat: patch %s failed and was rolled back: %s", name, exc)
                continue
            self._swaps[name] = swaps
            entry.action = Action.APPLIED
            entry.detail = f"{len(swaps)} attribute(s) replaced"
        return self.ledger

    def revert(self, names: Iterable[str] | None = None) -> None:
        """Put back exactly what the named (default: all) applied patches replaced."""
        selected = list(self._swaps) if names is None else [n for n in names if n in self._swaps]
        for name in reversed(selected):
            self._swaps.pop(name).restore()
            self.ledger[name].action = Action.REVERTED
            self.ledger[name].detail = "originals restored"

    def applied(self) -> list[str]:
        return list(self._swaps)

    def changed_targets(self, name: str) -> list[tuple[Any, Any]]:
        """What an applied patch replaced, for checks that revert restores it."""
        swaps = self._swaps.get(name)
        return [] if swaps is None else swaps.targets()
