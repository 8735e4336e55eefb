"""The hybrid Qwen refusal (patch ``hybrid_qwen_models``): what it reads, when it refuses, what it says.

The refusal needs a transformers without the hybrid types (legs 2025.10, 2025.3); here, on
transformers 5, the missing types are stood in for by making the lookup report them missing.
"""

from __future__ import annotations

import json

import pytest

from unsloth_qwen_compat import _qwen
from unsloth_qwen_compat._env import Environment, UnslothState, read_versions
from unsloth_qwen_compat.patches import hybrid_qwen_models
from unsloth_qwen_compat.patches.hybrid_qwen_models import (
    UnsupportedModelTypeError,
    refusing_unbuildable,
)


def test_reads_the_type_of_a_checkpoint_and_of_its_text_config() -> None:
    assert _qwen.hybrid_model_types_of({"model_type": "qwen3_next"}) == ["qwen3_next"]
    composite = {"model_type": "qwen3_5", "text_config": {"model_type": "qwen3_5_text"}}
    assert _qwen.hybrid_model_types_of(composite) == ["qwen3_5", "qwen3_5_text"]
    assert _qwen.hybrid_model_types_of({"model_type": "qwen3"}) == []


def test_this_transformers_has_every_hybrid_type() -> None:
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 has no Qwen3.5")
    assert _qwen.types_transformers_lacks(sorted(_qwen.HYBRID_MODEL_TYPES)) == []


def _environment() -> Environment:
    return Environment(
        python="", platform="", versions=read_versions(), gpu=None, unsloth=UnslothState("missing")
    )


def _checkpoint(tmp_path, model_type: str):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return str(tmp_path)


def _loader(model_name="default/model", max_seq_length=2048, token=None, revision=None, **kwargs):
    return ("loaded", model_name)


def test_refuses_a_type_transformers_lacks_before_loading(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(hybrid_qwen_models, "types_transformers_lacks", lambda types: list(types))
    wrapped = refusing_unbuildable(_loader, _environment())
    with pytest.raises(UnsupportedModelTypeError) as error:
        wrapped(model_name=_checkpoint(tmp_path, "qwen3_5_text"), max_seq_length=512)
    message = str(error.value)
    assert "Qwen3.5 model (model_type qwen3_5_text)" in message
    assert "unsloth==2026.10.9" in message and "transformers==" in message and "doctor" in message


def test_passes_other_models_and_unreadable_names_through(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(hybrid_qwen_models, "types_transformers_lacks", lambda types: list(types))
    wrapped = refusing_unbuildable(_loader, _environment())
    qwen3 = _checkpoint(tmp_path, "qwen3")
    assert wrapped(qwen3) == ("loaded", qwen3)
    assert wrapped(model_name=str(tmp_path / "no-such-dir")) == ("loaded", str(tmp_path / "no-such-dir"))


def test_a_hybrid_type_transformers_has_loads(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 has no Qwen3.5")
    wrapped = refusing_unbuildable(_loader, _environment())
    path = _checkpoint(tmp_path, "qwen3_5_text")
    assert wrapped(path) == ("loaded", path)
