"""The tested matrix: Unsloth x transformers legs the conformance suite runs on.

tox.ini has one ``gpu-<leg>`` env per entry (a CPU test keeps the two in step) and the
README's supported-versions table is checked against this list.
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
    #: The latest conformance result with the shim, as recorded in CONFORMANCE.md ("" = not run).
    conformance: str

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
        conformance="63/65 pass, 2 skipped (fp32 fused-QKV vs HF: no fused path at fp32), 0 fail (H200, fp32)",
    ),
    Leg(
        name="2025.10",
        unsloth="2025.10.12",
        unsloth_zoo="2025.10.13",
        transformers="4.57.1",
        trl="0.23.0",
        peft="0.17.1",
        expected_needs=("rope_scaling", "lora_target_maps", "kv_cache_left_padding", "qwen2_fused_qkv_bias"),
        conformance=(
            "65/65 pass (H200, fp32) vs 38/65 stock: 61 in the full run, the 4 bf16/nf4 fused-QKV "
            "cases after a harness dtype fix (stock 0/6 fused_qkv); RoPE cases re-run at the final code"
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
        ),
        conformance=(
            "46/65 pass, 19 refused (every Qwen3-MoE case), 0 fail (H200, bf16) vs 5/65 stock; "
            "the 4 qwen2/qwen3 adapter cases from a re-run after a harness fix"
        ),
    ),
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


def markdown_table() -> str:
    """The README's supported-versions table, generated from :data:`LEGS`."""
    rows = [
        "| leg (`tox -e gpu-<leg>`) | unsloth | unsloth_zoo | transformers | trl | peft | conformance with the shim |",
        "|---|---|---|---|---|---|---|",
    ]
    for leg in LEGS:
        recorded = leg.conformance or "not yet run"
        rows.append(
            f"| {leg.name} | {leg.unsloth} | {leg.unsloth_zoo} | {leg.transformers} | {leg.trl} "
            f"| {leg.peft} | {recorded} |"
        )
    return "\n".join(rows)
