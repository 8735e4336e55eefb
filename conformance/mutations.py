"""Deliberately broken patches, to show the suite catches a wrong fix.

Load with ``-p conformance.mutations`` and pick one with ``CONFORMANCE_MUTATION``:

- ``rope-base-1pct``: the shim's RoPE patch hands Unsloth the config's YaRN with
  rope_theta 1% too large whenever it extends past max_position_embeddings.

Every case that goes through the mutated code must fail; the rest must still pass.
"""

from __future__ import annotations

import os
from typing import Any

MUTATION = os.environ.get("CONFORMANCE_MUTATION", "")


def _rope_base_off_by_one_percent() -> None:
    from unsloth_qwen_compat.patches import rope_scaling

    honest = rope_scaling.extended_yarn

    def extended_yarn(config: Any, factor: float) -> dict[str, Any]:
        scaling = honest(config, factor)
        if scaling is None:  # the honest patch keeps the config as is
            scaling = {k: v for k, v in rope_scaling.rope_scaling_of(config).items() if k != "type"}
            scaling["rope_theta"] = rope_scaling.rope_theta_of(config)
        scaling["rope_theta"] *= 1.01
        return scaling

    rope_scaling.extended_yarn = extended_yarn


MUTATIONS = {"rope-base-1pct": _rope_base_off_by_one_percent}


def pytest_configure(config) -> None:
    if not MUTATION:
        return
    if MUTATION not in MUTATIONS:
        raise ValueError(f"CONFORMANCE_MUTATION={MUTATION!r}; known: {', '.join(MUTATIONS)}")
    MUTATIONS[MUTATION]()
    config._conformance_mutation = MUTATION


def pytest_report_header(config) -> str:
    return f"conformance mutation: {MUTATION or 'none'}"
