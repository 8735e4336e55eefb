"""The RoPE grid: every RoPE type the installed transformers implements, at three windows, on
every Qwen family (and Llama / Mistral controls).

A type joins by itself: the types are read from transformers' ``ROPE_INIT_FUNCTIONS`` (plus
plain RoPE), and a type without a recipe here gets the generic one (a factor). Factors,
bases, windows and sequence lengths are drawn from small ranges with a fixed seed, so each
type is tried at a point nobody picked by hand, and the same point on every run.

Windows per model (M = max_position_embeddings, C = what the config itself covers, by the
README's table):
- ``inside``: a length in (0.6 min(M, C), min(M, C)];
- ``past_max_positions``: in (M, C] (only where C > M);
- ``past_coverage``: in (C, C + M].

This module imports no Unsloth and no shim: the oracle process uses it too (its
``apply_rope`` builds the reference for an extended config). Its coverage, tables and
config rewriting restate ``unsloth_qwen_compat.rope_contract`` on purpose: the suite's
reading of the README must not be the shim's own code (tests/test_rope_patch.py checks that
the two agree on every grid cell).
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from conformance import zoo

FAMILIES = ("qwen2", "qwen3", "qwen3_moe")
#: Not Qwen: with the shim imported these must compute exactly what stock Unsloth computes.
CONTROL_FAMILIES = ("llama", "mistral")
SEED = 20261202
HALF_HEAD = zoo.HEAD_DIM // 2  # every grid family has head_dim 64 (qwen2, llama, mistral derive 256 / 4)


def rope_types() -> list[str]:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    return ["default", *sorted(k for k in ROPE_INIT_FUNCTIONS if k != "default")]


def _draw(family: str, kind: str) -> zoo.ModelSpec:
    rng = random.Random(f"{SEED}-{family}-{kind}")
    window = rng.randrange(96, 161, 8)
    theta = rng.choice([1e4, 1e6, float(round(rng.uniform(5e3, 5e5)))])
    top_level_original = 0
    if kind == "default":
        scaling = None
    elif kind == "linear" or kind == "dynamic":
        scaling = {"rope_type": kind, "factor": round(rng.uniform(1.5, 4.0), 3)}
    elif kind == "yarn":
        scaling = {
            "rope_type": "yarn",
            "factor": round(rng.uniform(2.0, 5.0), 3),
            "original_max_position_embeddings": rng.randrange(window // 2, window * 3 // 4 + 1, 4),
        }
        if rng.random() < 0.5:
            scaling["beta_fast"], scaling["beta_slow"] = (
                float(rng.choice([16, 32, 48])),
                float(rng.choice([1, 2])),
            )
    elif kind == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": round(rng.uniform(4.0, 8.0), 3),
            "low_freq_factor": round(rng.uniform(1.0, 2.0), 3),
            "high_freq_factor": round(rng.uniform(3.0, 6.0), 3),
            "original_max_position_embeddings": rng.randrange(window // 4, window // 2 + 1, 4),
        }
    elif kind == "longrope":
        original = rng.randrange(window // 4, window // 2 + 1, 4)
        scaling = {
            "rope_type": "longrope",
            "short_factor": [round(rng.uniform(1.0, 2.0), 3) for _ in range(HALF_HEAD)],
            "long_factor": [round(rng.uniform(2.0, 6.0), 3) for _ in range(HALF_HEAD)],
            "original_max_position_embeddings": original,
        }
        top_level_original = original  # where transformers 4 reads it
    else:  # a type added to transformers after this grid was written: the generic recipe
        scaling = {"rope_type": kind, "factor": round(rng.uniform(1.5, 4.0), 3)}
    return zoo.ModelSpec(
        family,
        f"grid-{kind}",
        scaling_json=json.dumps(scaling, sort_keys=True) if scaling else "",
        theta=theta,
        max_positions=window,
        top_level_original=top_level_original,
    )


@lru_cache(maxsize=1)
def models() -> dict[str, zoo.ModelSpec]:
    specs = [_draw(f, k) for f in (*FAMILIES, *CONTROL_FAMILIES) for k in rope_types()]
    return {spec.name: spec for spec in specs}


def _yarn_factor(spec: zoo.ModelSpec) -> float:
    """YaRN's factor as the installed transformers applies it (before 4.56 it is derived as
    max_position_embeddings / original when the original window is given)."""
    scaling = spec.scaling
    if "original_max_position_embeddings" in scaling and yarn_factor_derived():
        return spec.max_position_embeddings / scaling["original_max_position_embeddings"]
    return float(scaling["factor"])


@lru_cache(maxsize=1)
def yarn_factor_derived() -> bool:
    """Measured on two tiny configs that differ only in max_position_embeddings."""
    from transformers import Qwen2Config

    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    tables = []
    for window in (128, 512):
        kwargs = dict(
            hidden_size=64, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=window
        )
        if zoo.transformers_major() >= 5:
            config = Qwen2Config(rope_parameters={**scaling, "rope_theta": 1e4}, **kwargs)
        else:
            config = Qwen2Config(rope_scaling=scaling, rope_theta=1e4, **kwargs)
        tables.append(init_tables(config))
    return not _equal(tables[0], tables[1])


def coverage(spec: zoo.ModelSpec) -> int:
    """What the config covers, per type (README, "RoPE scaling contract")."""
    scaling, window = spec.scaling, spec.max_position_embeddings
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        return math.floor(scaling["factor"] * window)
    if kind == "yarn":
        original = scaling.get("original_max_position_embeddings", window)
        return math.floor(_yarn_factor(spec) * original)
    if kind == "llama3":
        return math.floor(scaling["factor"] * scaling["original_max_position_embeddings"])
    if kind == "longrope":
        return scaling["original_max_position_embeddings"]
    return window  # plain, dynamic, and types without a rule


def extension_rule_errors(spec: zoo.ModelSpec, max_seq_length: int, rope: dict[str, Any]) -> list[str]:
    """How an exposed extension departs from the README's rule for the checkpoint's type, given
    what the candidate's config says (``exposed_rope``); [] when it follows it.

    The rule: the base and every other parameter stay; plain RoPE becomes linear with factor
    max_seq_length / M; linear gets factor max_seq_length / M; yarn factor
    max_seq_length / original (original kept). Other types are never extended.
    """
    scaling = spec.scaling or {}
    kind = scaling.get("rope_type", "default")
    exposed = dict(rope.get("scaling") or {})
    errors = []
    if not math.isclose(rope["theta"], spec.theta, rel_tol=1e-9):
        errors.append(f"rope_theta {spec.theta:g} -> {rope['theta']:g}")
    window = spec.max_position_embeddings
    if kind in ("default", "linear"):
        expected = {"rope_type": "linear", "factor": max_seq_length / window}
    elif kind == "yarn":
        original = scaling.get("original_max_position_embeddings", window)
        expected = {
            **scaling,
            "original_max_position_embeddings": original,
            "factor": max_seq_length / original,
        }
    else:
        return errors + [f"{kind} is never extended (README)"]
    for key, value in expected.items():
        got = exposed.get(key)
        same = (
            math.isclose(got, value, rel_tol=1e-9)
            if isinstance(value, float) and got is not None
            else got == value
        )
        if not same:
            errors.append(f"{key} {value!r} expected, {got!r} exposed")
    return errors


@dataclass(frozen=True)
class Cell:
    spec: zoo.ModelSpec
    window: str  # inside | past_max_positions | past_coverage
    max_seq_length: int

    @property
    def control(self) -> bool:
        return self.spec.family in CONTROL_FAMILIES

    @property
    def rope_type(self) -> str:
        return (self.spec.scaling or {}).get("rope_type", "default")

    def __str__(self) -> str:  # the pytest id: test_rope_grid[qwen3-yarn-past_coverage-412]
        return f"{self.spec.family}-{self.rope_type}-{self.window}-{self.max_seq_length}"


def windows(spec: zoo.ModelSpec) -> list[Cell]:
    rng = random.Random(f"{SEED}-{spec.name}-windows")
    window, covered = spec.max_position_embeddings, coverage(spec)
    low = min(window, covered)
    cells = [Cell(spec, "inside", rng.randint(math.ceil(0.6 * low) + 1, low))]
    if covered > window:
        cells.append(Cell(spec, "past_max_positions", rng.randint(window + 1, covered)))
    cells.append(Cell(spec, "past_coverage", rng.randint(covered + 1, covered + window)))
    return cells


def cells(families: tuple[str, ...] = (*FAMILIES, *CONTROL_FAMILIES)) -> list[Cell]:
    return [cell for spec in models().values() if spec.family in families for cell in windows(spec)]


# --- used in the oracle process (transformers, never Unsloth) --------------------------------


def apply_rope(
    config: Any, scaling: Mapping[str, Any] | None, theta: float, max_position_embeddings: int
) -> Any:
    """A copy of ``config`` with this RoPE, spelled as the installed transformers reads it."""
    out = copy.deepcopy(config)
    out.max_position_embeddings = int(max_position_embeddings)
    scaling = dict(scaling or {})
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    scaling.pop("rope_theta", None)
    if isinstance(getattr(config, "rope_parameters", None), Mapping):  # transformers 5
        out.rope_parameters = {"rope_type": "default", **scaling, "rope_theta": float(theta)}
    else:
        out.rope_scaling = scaling if scaling.get("rope_type", "default") != "default" else None
        out.rope_theta = float(theta)
    return out


def _kind(config: Any) -> str:
    for attribute in ("rope_parameters", "rope_scaling"):
        value = getattr(config, attribute, None)
        if isinstance(value, Mapping):
            kind = value.get("rope_type") or value.get("type")
            if kind:
                return kind
    return "default"


def init_tables(config: Any, seq_len: int | None = None) -> tuple[Any, float]:
    """transformers' (inv_freq, attention_scaling) for ``config`` at a forward of ``seq_len``
    tokens (None: the tables it builds at init)."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind = _kind(config)
    if kind == "default" and kind not in ROPE_INIT_FUNCTIONS:  # transformers 5 computes it inline
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (_theta(config) ** exponents), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)
    return inv_freq.float(), float(scaling)


def _theta(config: Any) -> float:
    parameters = getattr(config, "rope_parameters", None)
    if isinstance(parameters, Mapping) and parameters.get("rope_theta") is not None:
        return float(parameters["rope_theta"])
    return float(getattr(config, "rope_theta", None) or 10000.0)


def _equal(a, b) -> bool:
    import torch

    return a[1] == b[1] and a[0].shape == b[0].shape and bool(torch.equal(a[0], b[0]))


def length_dependent(config: Any, length: int) -> bool:
    """Whether transformers computes other tables for a forward of ``length`` tokens than at init."""
    return not _equal(init_tables(config), init_tables(config, length))


def same_rope(a: Any, b: Any) -> bool:
    """Whether two configs give the same RoPE tables at init."""
    return _equal(init_tables(a), init_tables(b))


def exposed_rope(config: Any) -> dict[str, Any]:
    """What a loaded model's config says its RoPE is (scaling, base, window): plain attribute reads."""
    scaling = None
    for attribute in ("rope_parameters", "rope_scaling"):
        value = getattr(config, attribute, None)
        if value is not None and not isinstance(value, Mapping):
            value = value.to_dict() if callable(getattr(value, "to_dict", None)) else vars(value)
        if isinstance(value, Mapping) and (value.get("rope_type") or value.get("type")) not in (
            None,
            "default",
        ):
            scaling = {k: v for k, v in value.items() if k != "rope_theta"}
            if "type" in scaling:
                scaling.setdefault("rope_type", scaling.pop("type"))
            break
    return {
        "scaling": json.loads(json.dumps(scaling, default=float)) if scaling else None,
        "theta": _theta(config),
        "max_position_embeddings": int(config.max_position_embeddings),
    }
