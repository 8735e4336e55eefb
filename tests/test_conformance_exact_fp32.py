"""fp32 runs set flash-linear-attention's explicit TF32 solve to IEEE fp32 (conformance/candidate.py).

On a GPU, Unsloth injects its vendored fla on import and the suite changes one module global
before any kernel compiles; here a stand-in module plays fla's part.
"""

from __future__ import annotations

import sys
import types

import pytest

pytest.importorskip("triton")

from conformance import candidate  # noqa: E402

FLA_MODULE = "fla.ops.gated_delta_rule.chunk_fwd"


@pytest.fixture
def fake_fla(monkeypatch):
    import triton.language as tl

    module = types.ModuleType(FLA_MODULE)
    module.SOLVE_TRIL_DOT_PRECISION = tl.constexpr("tf32")  # as fla sets it on Ampere and newer
    monkeypatch.setitem(sys.modules, FLA_MODULE, module)
    return module


def test_an_fp32_run_makes_the_solve_ieee(fake_fla, monkeypatch) -> None:
    monkeypatch.setenv("CONFORMANCE_DTYPE", "fp32")
    assert candidate._exact_fp32_linear_attention() == "ieee"
    assert fake_fla.SOLVE_TRIL_DOT_PRECISION.value == "ieee"


def test_a_reduced_precision_run_leaves_it_as_fla_has_it(fake_fla, monkeypatch) -> None:
    monkeypatch.setenv("CONFORMANCE_DTYPE", "bf16")
    assert candidate._exact_fp32_linear_attention() == "left: not an fp32 run"
    assert fake_fla.SOLVE_TRIL_DOT_PRECISION.value == "tf32"


def test_without_fla_nothing_is_set(monkeypatch) -> None:
    monkeypatch.setenv("CONFORMANCE_DTYPE", "fp32")
    monkeypatch.delitem(sys.modules, FLA_MODULE, raising=False)
    assert candidate._exact_fp32_linear_attention() == "left: no flash-linear-attention loaded"
