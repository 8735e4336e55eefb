"""What each leg is expected to refuse. Any other refusal fails the case.

A refusal (``UnsupportedConfigurationError`` from the shim) is the honest answer where an
Unsloth release cannot train a configuration right; but a patch that started refusing
qwen2 would otherwise still pass the suite. So every refusal must be declared here, per
Unsloth release, with the reason the README gives.

RoPE configurations whose transformers tables change with the sequence length are not
listed: the RoPE grid allows their refusal case by case, from the oracle's facts. A hybrid
family (Qwen3.5, Qwen3.5-MoE, Qwen3-Next) whose model type the installed transformers lacks is
refused on every leg where that is so (the shim's ``hybrid_qwen_models`` patch), read from the
installed transformers rather than listed per leg.
"""

from __future__ import annotations

from conformance import versions, zoo

#: Unsloth release prefix -> {model family: why the shim refuses every case of it there}.
EXPECTED_BY_RELEASE: dict[str, dict[str, str]] = {
    "2025.3.": {"qwen3_moe": "Unsloth 2025.3 has no Qwen3-MoE path (qwen3_registration refuses it)"},
}


def expected(family: str, unsloth: str | None = None) -> str | None:
    """Why this leg refuses ``family``, or None when a refusal of it is a failure."""
    unsloth = unsloth if unsloth is not None else (versions.package_version("unsloth") or "")
    spec = zoo.BY_NAME.get(f"{family}-plain")
    if spec is not None and spec.hybrid and not zoo.transformers_builds(spec):
        return (
            f"transformers {versions.package_version('transformers')} has no {spec.model_type} model "
            "(hybrid_qwen_models refuses it)"
        )
    for prefix, families in EXPECTED_BY_RELEASE.items():
        if unsloth.startswith(prefix) and family in families:
            return families[family]
    return None


def check(family: str, message: str) -> None:
    """Raise for a refusal this leg does not declare; return quietly for a declared one."""
    if expected(family) is None:
        raise AssertionError(
            f"unexpected refusal of {family} on Unsloth {versions.package_version('unsloth')}: {message}\n"
            "  declare it in conformance/refusals.py (with the README's reason) or fix the patch"
        )
