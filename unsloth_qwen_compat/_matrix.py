"""The tested matrix: Unsloth x transformers legs the conformance suite runs on.

tox.ini has one ``gpu-<leg>`` env per entry (a CPU test keeps the two in step). The
README's supported-versions table is generated from this list and the raw reports a
checkout holds (:mod:`._legs_table`); measured numbers live in those reports and in
CONFORMANCE.md, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.version import Version

from ._env import Environment, release_of


@dataclass(frozen=True)
class Leg:
    name: str
    unsloth: str
    unsloth_zoo: str
    transformers: str
    trl: str
    peft: str
    #: Patches stock Unsloth on this leg was measured to need (DESIGN.md section 1).
    expected_needs: tuple[str, ...]
    #: Whether CONFORMANCE.md records a conformance run of this leg.
    measured: bool = True
    #: A leg that follows the newest releases (``latest``): its pins move, see :data:`MOVING_LEG_RECIPE`.
    moving: bool = False

    @property
    def conformance(self) -> str:
        """Where this leg's conformance record is ("" = never run), for ``doctor``: the
        numbers themselves are in the record, not in the package."""
        return "recorded in CONFORMANCE.md" if self.measured else ""

    def pins(self) -> list[str]:
        return [
            f"unsloth=={self.unsloth}",
            f"unsloth_zoo=={self.unsloth_zoo}",
            f"transformers=={self.transformers}",
            f"trl=={self.trl}",
            f"peft=={self.peft}",
        ]


LEGS: tuple[Leg, ...] = (
    Leg(
        name="2026.10",
        unsloth="2026.10.9",
        unsloth_zoo="2026.10.9",
        transformers="5.17.0",
        trl="1.15.0",
        peft="0.21.2",
        expected_needs=("rope_scaling", "lora_target_maps", "qwen2_fused_qkv_bias"),
    ),
    Leg(
        name="2025.10",
        unsloth="2025.10.12",
        unsloth_zoo="2025.10.13",
        transformers="4.57.1",
        trl="0.23.0",
        peft="0.17.1",
        expected_needs=(
            "rope_scaling",
            "lora_target_maps",
            "kv_cache_left_padding",
            "qwen2_fused_qkv_bias",
            "hybrid_qwen_models",
        ),
    ),
    Leg(
        name="2025.3",
        unsloth="2025.3.19",
        unsloth_zoo="2025.3.17",
        transformers="4.51.3",
        trl="0.15.2",
        peft="0.15.2",
        expected_needs=(
            "qwen3_registration",
            "rope_scaling",
            "sdpa_causal_fallback",
            "lora_target_maps",
            "chat_templates",
            "kv_cache_left_padding",
            "qwen2_fused_qkv_bias",
            "hybrid_qwen_models",
        ),
    ),
    # The drift canary: the newest tested Unsloth with the newest transformers, trl and peft
    # releases. Unsloth 2026.10.9 declares transformers<=5.17.0 and trl<=1.15.0; the legs
    # install with --no-deps, so this one runs past those caps on purpose, to see a break the
    # day a release lands. Its verdicts were read on CPU (UNSLOTH_ALLOW_CPU=1, 2026-12-02), and
    # its whole conformance run (every case, shim and stock) is recorded (H200, 2026-12-03).
    Leg(
        name="latest",
        unsloth="2026.10.9",
        unsloth_zoo="2026.10.9",
        transformers="5.24.0",
        trl="1.16.0",
        peft="0.21.2",
        expected_needs=("rope_scaling", "lora_target_maps", "qwen2_fused_qkv_bias"),
        moving=True,
    ),
)

#: How to move the ``latest`` leg to new releases (``doctor`` prints it).
MOVING_LEG_RECIPE = (
    "find the newest releases: pip index versions transformers (also trl, peft, unsloth, unsloth_zoo)",
    "set them on the leg in unsloth_qwen_compat/_matrix.py and on its lines in tox.ini "
    "(tests/test_matrix.py keeps the two equal); keep unsloth at its newest tested release "
    "until a new one passes there",
    "build its wheels (pip download --no-deps --only-binary=:all: --python-version 3.12 ...) and run "
    "tox -e gpu-{leg} or conformance/offline_legs.sh REPORTS {leg} on a GPU",
    "commit the run's raw reports under the leg's name, regenerate the README tables (python -m "
    "unsloth_qwen_compat._legs_table --readme README.md, python -m conformance.model_table "
    "--readme README.md) and set expected_needs to what status says there",
)


def leg_named(name: str) -> Leg:
    for leg in LEGS:
        if leg.name == name:
            return leg
    raise KeyError(f"no leg {name!r}; legs: {', '.join(leg.name for leg in LEGS)}")


def matching_leg(env: Environment) -> Leg | None:
    """The leg whose Unsloth and transformers releases are installed, if any."""
    unsloth, transformers = env.version("unsloth"), env.version("transformers")
    if unsloth is None or transformers is None:
        return None
    for leg in LEGS:
        if release_of(unsloth) == Version(leg.unsloth) and release_of(transformers) == Version(
            leg.transformers
        ):
            return leg
    return None


def newest_tested_unsloth() -> Version:
    return max(Version(leg.unsloth) for leg in LEGS)
