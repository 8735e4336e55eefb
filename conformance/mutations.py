"""Deliberately broken patches, to show the suite catches a wrong fix.

Load with ``-p conformance.mutations`` and pick one with ``CONFORMANCE_MUTATION``:

- ``rope-base-1pct``: the RoPE patch builds Qwen models past max_position_embeddings with
  rope_theta 1% too large.
- ``rope-linear-factor``: a linear scaling is built with its factor 25% too large.
- ``rope-dynamic-static``: dynamic NTK past max_position_embeddings is trained with its init
  table instead of refused.
- ``rope-yarn-linear``: YaRN past max_position_embeddings becomes linear scaling (stock
  Unsloth 2026.10.9's rule).

Every case that goes through the mutated code must fail; the rest must still pass.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

MUTATION = os.environ.get("CONFORMANCE_MUTATION", "")


def _mutate_plan(change: Callable[[Any, Any], Any]) -> None:
    """Wrap the plan the RoPE patch follows (looked up in its module at every load)."""
    from unsloth_qwen_compat.patches import rope_scaling

    honest = rope_scaling.plan_rope

    def plan_rope(config: Any, max_seq_length: int) -> Any:
        return change(config, honest(config, max_seq_length))

    rope_scaling.plan_rope = plan_rope


def _with_scaling(plan: Any, **changes: Any) -> Any:
    return dataclasses.replace(plan, scaling={**plan.scaling, **changes})


def _rope_base_off_by_one_percent() -> None:
    def change(config: Any, plan: Any) -> Any:
        if plan.scaling is None or plan.max_seq_length <= plan.max_position_embeddings:
            return plan
        return _with_scaling(plan, rope_theta=plan.scaling["rope_theta"] * 1.01)

    _mutate_plan(change)


def _linear_factor_off() -> None:
    def change(config: Any, plan: Any) -> Any:
        if plan.scaling is None or plan.scaling.get("rope_type") != "linear":
            return plan
        return _with_scaling(plan, factor=plan.scaling["factor"] * 1.25)

    _mutate_plan(change)


def _dynamic_trained_static() -> None:
    from unsloth_qwen_compat.rope_contract import SAME, rope_scaling_of, rope_theta_of

    def change(config: Any, plan: Any) -> Any:
        if plan.rope_type != "dynamic" or plan.outcome != "refused":
            return plan
        scaling = {**rope_scaling_of(config), "rope_theta": rope_theta_of(config)}
        return dataclasses.replace(plan, outcome=SAME, scaling=scaling, reason="mutated: kept")

    _mutate_plan(change)


def _yarn_becomes_linear() -> None:
    def change(config: Any, plan: Any) -> Any:
        if plan.rope_type != "yarn" or plan.max_seq_length <= plan.max_position_embeddings:
            return plan
        factor = plan.max_seq_length / plan.max_position_embeddings
        scaling = {"rope_type": "linear", "factor": factor, "rope_theta": plan.scaling["rope_theta"]}
        return dataclasses.replace(plan, scaling=scaling)

    _mutate_plan(change)


MUTATIONS = {
    "rope-base-1pct": _rope_base_off_by_one_percent,
    "rope-linear-factor": _linear_factor_off,
    "rope-dynamic-static": _dynamic_trained_static,
    "rope-yarn-linear": _yarn_becomes_linear,
}


def pytest_configure(config) -> None:
    if not MUTATION:
        return
    if MUTATION not in MUTATIONS:
        raise ValueError(f"CONFORMANCE_MUTATION={MUTATION!r}; known: {', '.join(MUTATIONS)}")
    MUTATIONS[MUTATION]()
    config._conformance_mutation = MUTATION


def pytest_report_header(config) -> str:
    return f"conformance mutation: {MUTATION or 'none'}"
