"""Refuse Qwen3.5 / Qwen3.5-MoE / Qwen3-Next where the installed transformers cannot build them.

These hybrid models (gated-DeltaNet linear attention beside full attention) exist in
transformers only from the release that added each type (Qwen3-Next in 4.57, Qwen3.5 in
5.x). On an older transformers, ``FastLanguageModel.from_pretrained`` and
``FastModel.from_pretrained`` fail somewhere inside transformers' config lookup with a
message about an unrecognised architecture. The patch reads the checkpoint's
``config.json`` first and raises :class:`UnsupportedConfigurationError` naming the model,
the missing type, the installed versions and the tested pins that run it. Where the
installed transformers has every hybrid type, there is nothing to refuse (``native``).
"""

from __future__ import annotations

import functools
import inspect
from types import ModuleType
from typing import Any

from .._env import Environment
from .._qwen import HYBRID_MODEL_TYPES, hybrid_model_types_of, types_transformers_lacks
from .._registry import (
    AttributeSwaps,
    Patch,
    ProbeResult,
    UnsupportedConfigurationError,
    native,
    needed,
    unsupported,
)


class UnsupportedModelTypeError(UnsupportedConfigurationError):
    """A hybrid Qwen checkpoint the installed transformers has no model for, refused at load."""


def refusal_message(model_name: str, missing: list[str], env: Environment) -> str:
    from .._matrix import LEGS

    families = sorted({HYBRID_MODEL_TYPES[t] for t in missing})
    newest = LEGS[0]
    return (
        f"unsloth_qwen_compat: {model_name} is a {' / '.join(families)} model (model_type "
        f"{', '.join(missing)}), which the installed transformers {env.version('transformers')} does not "
        f"have, so Unsloth {env.version('unsloth')} cannot build it. The tested leg that runs it: "
        f"{' '.join(newest.pins())} (`python -m unsloth_qwen_compat doctor` lists every leg); "
        "upgrade those, or load this model in an environment that has them."
    )


def checkpoint_config(model_name: str, bound: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's raw ``config.json`` (no model type lookup), or None where it cannot be
    read (an adapter directory, no network): then upstream decides, as without the patch."""
    try:
        from transformers import PretrainedConfig

        config, _ = PretrainedConfig.get_config_dict(
            model_name, token=bound.get("token"), revision=bound.get("revision")
        )
    except Exception:  # noqa: BLE001 - an unreadable config is upstream's to report
        return None
    return config


def refuse_if_unbuildable(model_name: str, env: Environment, **hub: Any) -> None:
    """Raise :class:`UnsupportedModelTypeError` when ``model_name`` is a hybrid Qwen checkpoint
    the installed transformers has no model for (``hub``: ``token``, ``revision``)."""
    config = checkpoint_config(model_name, hub) if model_name else None
    missing = types_transformers_lacks(hybrid_model_types_of(config)) if config else []
    if missing:
        raise UnsupportedModelTypeError(refusal_message(model_name, missing, env))


def refusing_unbuildable(from_pretrained: Any, env: Environment) -> Any:
    signature = inspect.signature(from_pretrained)

    @functools.wraps(from_pretrained)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs).arguments
        name = bound.get("model_name", signature.parameters["model_name"].default)
        refuse_if_unbuildable(str(name or ""), env, token=bound.get("token"), revision=bound.get("revision"))
        return from_pretrained(*args, **kwargs)

    wrapper.__unsloth_qwen_compat__ = True  # type: ignore[attr-defined]
    return wrapper


def _loading_classes(loader: ModuleType) -> list[type]:
    """The classes whose own ``from_pretrained`` the two entry points run (FastModel's may be
    inherited from FastBaseModel), each once."""
    owners: list[type] = []
    for name in ("FastLanguageModel", "FastModel"):
        cls = getattr(loader, name, None)
        owner = next((c for c in getattr(cls, "__mro__", ()) if "from_pretrained" in vars(c)), None)
        if owner is not None and owner not in owners:
            owners.append(owner)
    return owners


class HybridQwenModels(Patch):
    name = "hybrid_qwen_models"
    summary = "Qwen3.5 / Qwen3.5-MoE / Qwen3-Next refused where transformers cannot build them"
    unsloth_module = "unsloth.models.loader"
    reproduction = """\
# transformers without qwen3_5 (e.g. 4.57.1), any Unsloth:
from unsloth import FastModel
FastModel.from_pretrained("Qwen/Qwen3.5-4B")  # fails inside transformers' config lookup
"""

    def probe(self, loader: ModuleType, env: Environment) -> ProbeResult:
        if len(_loading_classes(loader)) == 0:
            return unsupported(
                "FastLanguageModel / FastModel.from_pretrained not found: layout changed upstream"
            )
        missing = types_transformers_lacks(sorted(HYBRID_MODEL_TYPES))
        if missing:
            return needed(
                f"transformers {env.version('transformers')} has no {', '.join(missing)}: loading such a "
                "checkpoint fails inside transformers instead of saying why"
            )
        return native(f"transformers {env.version('transformers')} builds every hybrid Qwen type")

    def install(self, swaps: AttributeSwaps, loader: ModuleType, env: Environment) -> None:
        for owner in _loading_classes(loader):
            swaps.wrap_staticmethod(owner, "from_pretrained", lambda f: refusing_unbuildable(f, env))
