"""What is installed: package versions, the GPU, the state of Unsloth, and the switches.

Versions come from package metadata (``importlib.metadata``), never from importing the
package, so reading them is cheap and works for packages that fail to import. Every
on/off environment variable the shim reads goes through :func:`switch` (the shim's own)
or :func:`unsloth_switch` (Unsloth's, read as Unsloth reads them).
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from packaging.version import InvalidVersion, Version

from ._warnings import warn

#: Distributions whose versions the shim reports, in the order ``status`` prints them.
TRACKED_DISTRIBUTIONS: tuple[str, ...] = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "bitsandbytes",
    "unsloth",
    "unsloth_zoo",
)

#: Unsloth import modes, as recorded in :class:`UnslothState.mode`.
MODE_MISSING = "missing"  # not installed
MODE_IMPORT_FAILED = "import-failed"  # installed, but ``import unsloth`` raised
MODE_GPU = "gpu"  # the real GPU code path
MODE_CPU_FALLBACK = "cpu-fallback"  # no GPU: Unsloth runs stock transformers code
MODE_CPU_ALLOWED = "cpu-allowed"  # no GPU, UNSLOTH_ALLOW_CPU=1: GPU code imported, cannot load
MODE_NOT_IMPORTED = "not-imported"  # the shim was disabled before importing Unsloth


#: What :func:`switch` reads as on and as off, in any case and with surrounding whitespace.
SWITCH_ON = ("1", "true", "yes", "on")
SWITCH_OFF = ("0", "false", "no", "off")
_warned_switches: set[str] = set()


def switch(name: str, default: bool = False) -> bool:
    """The shim's on/off environment variable ``name``; unset or empty is ``default``.

    Any other value than :data:`SWITCH_ON` / :data:`SWITCH_OFF` warns (once per variable)
    and counts as ``default``: a misspelt switch must not silently flip a patch.
    """
    value = os.environ.get(name, "").strip().lower()
    if value in SWITCH_ON:
        return True
    if value in SWITCH_OFF:
        return False
    if value and name not in _warned_switches:
        _warned_switches.add(name)
        warn(
            f"{name}={os.environ[name]!r} is not an on/off value (on: {'/'.join(SWITCH_ON)}; "
            f"off: {'/'.join(SWITCH_OFF)}; any case; empty or unset: the default); "
            f"using the default ({'on' if default else 'off'})"
        )
    return default


def unsloth_switch(name: str) -> bool:
    """Unsloth's environment variable ``name``, read as Unsloth reads it: on only when it is "1".

    Reading it any other way would make the shim disagree with what Unsloth does. A value
    the shim's own switches would take as on (``true``, ``yes``...) warns once, since
    Unsloth ignores it.
    """
    value = os.environ.get(name, "")
    if value.strip().lower() in SWITCH_ON and value != "1" and name not in _warned_switches:
        _warned_switches.add(name)
        warn(f"{name}={value!r} is off for Unsloth, which turns it on only for the exact value '1'")
    return value == "1"


def distribution_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        # Distribution names normalise "-" and "_" differently across tools.
        alternative = name.replace("_", "-") if "_" in name else name.replace("-", "_")
        try:
            return metadata.version(alternative)
        except metadata.PackageNotFoundError:
            return None


def parse_version(text: str | None) -> Version | None:
    """``packaging`` Version of ``text``; None for missing or unparsable strings.

    Local labels (``2.11.0+cu130``) and dev/rc builds parse; callers that compare
    against release pins use :func:`release_of` to drop them explicitly.
    """
    if not text:
        return None
    try:
        return Version(text)
    except InvalidVersion:
        return None


def release_of(version: Version) -> Version:
    """The release a version belongs to: ``2026.10.9.dev3+g1a2b`` -> ``2026.10.9``.

    A dev or rc build of X is treated as X for matching the tested matrix, and callers
    flag it as a pre-release (see :attr:`Environment.prerelease`).
    """
    return Version(".".join(str(part) for part in version.release))


@dataclass(frozen=True)
class GpuInfo:
    name: str
    count: int
    capability: str
    cuda: str | None

    def describe(self) -> str:
        many = f"{self.count} x " if self.count > 1 else ""
        cuda = f", CUDA {self.cuda}" if self.cuda else ""
        return f"{many}{self.name} (sm_{self.capability}{cuda})"


def detect_gpu() -> GpuInfo | None:
    """The CUDA GPU torch sees, or None (no torch, no CUDA build, or no device)."""
    try:
        import torch
    except Exception:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        return GpuInfo(
            name=torch.cuda.get_device_name(0),
            count=torch.cuda.device_count(),
            capability=f"{major}{minor}",
            cuda=torch.version.cuda,
        )
    except Exception:
        return None


@dataclass
class UnslothState:
    """How ``import unsloth`` went in this process."""

    mode: str
    error: str | None = None
    module: Any = field(default=None, repr=False)

    @property
    def usable(self) -> bool:
        """True when Unsloth's GPU code is importable here (so its classes can be patched)."""
        return self.mode in (MODE_GPU, MODE_CPU_ALLOWED)


@dataclass
class Environment:
    python: str
    platform: str
    versions: dict[str, str | None]
    gpu: GpuInfo | None
    unsloth: UnslothState
    transformers_imported_first: bool = False

    def version(self, name: str) -> Version | None:
        return parse_version(self.versions.get(name))

    @property
    def prerelease(self) -> list[str]:
        """Tracked distributions installed as dev/rc/pre builds."""
        out = []
        for name in TRACKED_DISTRIBUTIONS:
            version = self.version(name)
            if version is not None and (version.is_prerelease or version.is_devrelease):
                out.append(name)
        return out

    @property
    def transformers_major(self) -> int | None:
        version = self.version("transformers")
        return None if version is None else version.major

    def as_dict(self) -> dict[str, Any]:
        return {
            "python": self.python,
            "platform": self.platform,
            "versions": dict(self.versions),
            "gpu": None
            if self.gpu is None
            else {
                "name": self.gpu.name,
                "count": self.gpu.count,
                "capability": self.gpu.capability,
                "cuda": self.gpu.cuda,
            },
            "unsloth_mode": self.unsloth.mode,
            "unsloth_error": self.unsloth.error,
            "transformers_imported_first": self.transformers_imported_first,
        }


def read_versions() -> dict[str, str | None]:
    return {name: distribution_version(name) for name in TRACKED_DISTRIBUTIONS}


def unsloth_mode_after_import(module: Any, gpu: GpuInfo | None) -> str:
    """GPU, CPU fallback or CPU-allowed, from the imported ``unsloth`` module.

    2026.x sets ``_IS_CPU_BACKEND`` when it fell back to stock transformers code;
    older releases have no CPU mode (they raise on import without a GPU).
    """
    if getattr(module, "_IS_CPU_BACKEND", False):
        return MODE_CPU_FALLBACK
    if gpu is None and unsloth_switch("UNSLOTH_ALLOW_CPU"):
        return MODE_CPU_ALLOWED
    return MODE_GPU


def describe_python() -> str:
    return f"{platform.python_implementation()} {sys.version.split()[0]}"
