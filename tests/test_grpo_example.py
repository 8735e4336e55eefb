"""``examples/grpo_trl.py`` on CPU: both loops (TRL's GRPOTrainer and the hand-written one)
on the HF path for 5 steps on a tiny random Qwen3, and the example's checks and CPU
log-prob stand-in on their own.

The runs are child processes (the example hides Unsloth from its HF run, which this
process cannot undo). The Unsloth path and ``--compare-paths`` need a CUDA GPU; the
comparison's verdict is checked here on real CPU outputs and made-up ones.
"""

from __future__ import annotations

import importlib.util
import json
import math
import types

import pytest
import torch

from .conftest import REPO, run_python

EXAMPLE = REPO / "examples" / "grpo_trl.py"
STEPS = 5


def _load_example() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("grpo_trl", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the module's top level imports the standard library only
    return module


grpo = _load_example()


@pytest.mark.parametrize("loop", ["trl", "custom"])
def test_both_loops_train_on_the_hf_path_and_pass_their_checks(loop: str, tmp_path) -> None:
    done = run_python(
        "", args=[str(EXAMPLE), "--out", str(tmp_path), "--loop", loop, "--steps", str(STEPS)], timeout=300
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "grpo.json").read_text())
    assert (result["framework"], result["loop"], result["passed"]) == ("hf", loop, True)
    assert result["versions"]["unsloth"] is None  # the HF run hid Unsloth: stock transformers and TRL
    if loop == "trl":
        assert result["trainer"] == "trl.trainer.grpo_trainer.GRPOTrainer"
        expected_kernel = "trl (Triton)" if torch.cuda.is_available() else "torch stand-in (no CUDA)"
        assert result["trl_log_prob_kernel"] == expected_kernel

    steps = result["steps"]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for step in steps:
        assert set(grpo.STEP_FIELDS) <= set(step), sorted(set(grpo.STEP_FIELDS) - set(step))
        for field in ("reward", "reward_std", "loss", "kl", "generation_seconds", "step_seconds"):
            assert isinstance(step[field], float) and math.isfinite(step[field]), (field, step)
        assert (
            0 < step["generated_tokens"] <= grpo.PROMPTS_PER_STEP * grpo.NUM_GENERATIONS * grpo.MAX_NEW_TOKENS
        )
        assert 0 < step["generation_seconds"] < step["step_seconds"]
    # The adapter starts at zero: the policy is the reference at step 1, and drifts after.
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["kl"] > 0

    # The first-step batch, scored before training: the same on both loops (same seed).
    first = result["first_step"]
    assert result["bound_dtype"] == "fp32" and result["precision"] == "fp32"
    assert (
        first["completion_tokens"]
        == sum(grpo.MAX_NEW_TOKENS * (i + 1) // grpo.NUM_GENERATIONS for i in range(grpo.NUM_GENERATIONS))
        * grpo.PROMPTS_PER_STEP
    )  # replies of 4 lengths per group
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["nll"] > 0 and first["adapter_grad_norm"] > 0
    grads = torch.load(tmp_path / grpo.FIRST_STEP_GRADS)
    assert (
        len(grads) == first["adapter_grad_tensors"] == 2 * 2 * 7
    )  # lora_A and lora_B, 7 projections, 2 layers
    assert any(g.abs().sum() > 0 for name, g in grads.items() if "lora_B" in name)
    _compare_with_itself(result, grads)

    checks = {check["name"]: check["passed"] for check in result["checks"]}
    assert len(checks) == 4, checks
    memory = next(name for name in checks if name.startswith("peak memory"))
    measurable = result["peak_memory_kind"] != "n/a"
    if measurable:
        assert all(isinstance(s["peak_memory_bytes"], int) for s in steps)
    assert checks.pop(memory) is (True if measurable else None)
    assert all(passed is True for passed in checks.values()), result["checks"]


# --------------------------------------------------------------------------------------
# The checks catch what they are for


def _model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # the "base"
    return model


def _verdicts(before, model) -> list[bool]:
    return [check["passed"] for check in grpo.weight_checks(before, model)]


def test_weight_checks_pass_when_only_the_adapter_moved() -> None:
    model = _model()
    before = grpo.WeightSnapshot(model)
    with torch.no_grad():
        model[1].weight.add_(0.1)
        model[1].bias.add_(0.1)
    assert _verdicts(before, model) == [True, True]


def test_weight_checks_fail_on_an_adapter_tensor_that_did_not_move() -> None:
    model = _model()
    before = grpo.WeightSnapshot(model)
    with torch.no_grad():
        model[1].weight.add_(0.1)  # the bias is left as it was
    assert _verdicts(before, model) == [False, True]


def test_weight_checks_fail_on_a_base_weight_that_moved() -> None:
    model = _model()
    before = grpo.WeightSnapshot(model)
    with torch.no_grad():
        model[1].weight.add_(0.1)
        model[1].bias.add_(0.1)
        model[0].weight[0, 0] += 1e-6  # one element, barely
    assert _verdicts(before, model) == [True, False]


def _records(peaks: list[int | None]) -> list[dict]:
    return [{"step": i + 1, "peak_memory_bytes": peak} for i, peak in enumerate(peaks)]


@pytest.mark.parametrize(
    ("peaks", "kind", "expected"),
    [
        ([110, 100, 100, 101, 104], "rss_high_water", True),  # step 1 (warm-up) may be larger
        ([100, 100, 100, 103, 106], "cuda_max_memory_allocated", False),  # step 5 is 6% above step 2
        ([None] * 5, "n/a", None),  # not measurable: said so, not passed
    ],
)
def test_memory_check_compares_later_steps_with_step_2(peaks: list, kind: str, expected: bool | None) -> None:
    assert grpo.memory_check(_records(peaks), kind)["passed"] is expected


def test_logging_check_names_a_missing_or_non_finite_value() -> None:
    good = {field: 1.0 for field in grpo.STEP_FIELDS} | {"generated_tokens": 3}
    records = [good | {"step": 1}, good | {"step": 2, "kl": math.nan}, {"step": 3}]
    check = grpo.logging_check(records, steps=3)
    assert check["passed"] is False
    assert "step 2" in check["detail"] and "step 3" in check["detail"] and "step 1" not in check["detail"]


# --------------------------------------------------------------------------------------
# TRL's log-prob kernel off the GPU


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_torch_stand_in_matches_trl_log_probs_and_entropy(temperature: float) -> None:
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 8, generator=generator, requires_grad=True)
    weight = torch.randn(11, 8, generator=generator)
    targets = torch.randint(0, 11, (6,), generator=generator)
    log_probs, entropy, *rest = grpo.torch_token_log_probs(
        hidden, weight, None, targets, temperature, 4, None, 1.0, ("log_probs", "entropy")
    )
    logits = (hidden @ weight.T) / temperature
    torch.testing.assert_close(log_probs, selective_log_softmax(logits, targets))
    torch.testing.assert_close(entropy, entropy_from_logits(logits))
    assert rest == [None, None, None]
    # Differentiable, as TRL's kernel is.
    (gradient,) = torch.autograd.grad(log_probs.sum(), hidden)
    (reference,) = torch.autograd.grad(selective_log_softmax(logits, targets).sum(), hidden)
    torch.testing.assert_close(gradient, reference)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the example keeps TRL's kernel")
def test_stand_in_refuses_a_trl_kernel_with_other_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    import trl.trainer.utils as trl_utils

    class Drifted(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets, temperature):  # noqa: ANN001, ANN205
            return hidden

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Drifted)
    with pytest.raises(RuntimeError, match="CPU stand-in expects"):
        grpo.use_torch_log_probs_off_gpu()
    assert trl_utils._ChunkedLogProbFunction is Drifted


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the example keeps TRL's kernel")
def test_stand_in_replaces_the_installed_trl_kernel_off_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import trl.trainer.utils as trl_utils
    from trl.kernels import ChunkedLogProbFunction

    # The installed TRL's own kernel (Unsloth, when a test imported it here, wraps it on CPU).
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", ChunkedLogProbFunction)
    assert grpo.use_torch_log_probs_off_gpu() == "torch stand-in (no CUDA)"
    assert trl_utils._ChunkedLogProbFunction.apply is grpo.torch_token_log_probs


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the example keeps TRL's kernel")
def test_stand_in_keeps_unsloths_cpu_routing(monkeypatch: pytest.MonkeyPatch) -> None:
    import trl.trainer.utils as trl_utils

    class UnslothRouting:  # what unsloth_zoo's CPU fallback installs when Unsloth is imported
        _unsloth_cpu_dispatch = True

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", UnslothRouting)
    assert grpo.use_torch_log_probs_off_gpu() == "unsloth_zoo CPU routing"
    assert trl_utils._ChunkedLogProbFunction is UnslothRouting


# --------------------------------------------------------------------------------------
# --compare-paths' verdict (its runs need a CUDA GPU; the comparison itself does not)


def _compare_with_itself(result: dict, grads: dict) -> None:
    """A real run's outputs against themselves pass; a defect the size of a wrong LoRA
    scale in one gradient tensor, or a 1% log-likelihood shift, fails (fp32 bounds)."""
    same = grpo.path_comparison({"hf": result, "unsloth": result}, {"hf": grads, "unsloth": grads})
    assert same["passed"], same["checks"]
    assert same["first_step_replies_identical"] is True
    name = next(n for n, g in grads.items() if "lora_B" in n and g.abs().sum() > 0)
    scaled = {**grads, name: grads[name] * 2}
    worse = grpo.path_comparison({"hf": result, "unsloth": result}, {"hf": grads, "unsloth": scaled})
    assert [c["passed"] for c in worse["checks"]] == [True, True, True, True, False]
    assert name in worse["checks"][-1]["detail"]
    shifted = {**result, "first_step": {**result["first_step"], "nll": result["first_step"]["nll"] * 1.01}}
    nll = grpo.path_comparison({"hf": result, "unsloth": shifted}, {"hf": grads, "unsloth": grads})
    assert [c["passed"] for c in nll["checks"]] == [True, True, True, False, True]


def _path_result(nll: float, replies: list[list[int]], passed: bool = True, dtype: str = "bf16") -> dict:
    return {
        "passed": passed,
        "trainer": "t",
        "bound_dtype": dtype,
        "steps": [{"step": 1, "loss": 0.0, "reward": 0.5}],
        "first_step": {"loss": -0.36, "nll": nll},
        "first_step_completion_ids": replies,
    }


def _grads(scale: float = 1.0) -> dict:
    return {"lora_B": torch.tensor([1.0, 2.0, 3.0]) * scale, "lora_A": torch.zeros(3)}


@pytest.mark.parametrize(
    ("hf_nll", "unsloth_nll", "grad_scale", "expected"),
    [
        (6.0, 6.05, 1.0, True),  # 0.8% apart: within bf16's lora_loss_rel (1e-2)
        (6.0, 6.10, 1.0, False),  # 1.7% apart
        (6.0, 6.0, 1.15, True),  # gradients 15% apart: within bf16's lora_grad_rel (0.2)
        (6.0, 6.0, 2.0, False),  # a wrong LoRA scale
    ],
)
def test_path_comparison_bounds_the_first_step_scores_by_the_suites_table(
    hf_nll: float, unsloth_nll: float, grad_scale: float, expected: bool
) -> None:
    summary = grpo.path_comparison(
        {"hf": _path_result(hf_nll, [[1, 2]]), "unsloth": _path_result(unsloth_nll, [[1, 3]])},
        {"hf": _grads(), "unsloth": _grads(grad_scale)},
    )
    assert summary["passed"] is expected, summary["checks"]
    assert summary["first_step_replies_identical"] is False
    assert all("bf16" in c["name"] for c in summary["checks"][2:])


def test_path_comparison_fails_when_a_path_failed_is_missing_or_scored_in_another_dtype() -> None:
    def compare(hf: dict, unsloth: dict | None, grads: dict | None = None) -> dict:
        results = {"hf": hf} if unsloth is None else {"hf": hf, "unsloth": unsloth}
        return grpo.path_comparison(results, grads or {"hf": _grads(), "unsloth": _grads()})

    failed = compare(_path_result(6.0, [[1]]), _path_result(6.0, [[1]], passed=False))
    assert failed["passed"] is False and failed["first_step_replies_identical"] is True
    missing = compare(_path_result(6.0, [[1]]), None)
    assert missing["passed"] is False and missing["first_step_replies_identical"] is None
    other_dtype = compare(_path_result(6.0, [[1]]), _path_result(6.0, [[1]], dtype="fp32"))
    assert other_dtype["passed"] is False
    renamed = compare(
        _path_result(6.0, [[1]]),
        _path_result(6.0, [[1]]),
        {"hf": _grads(), "unsloth": {"other": torch.ones(3)}},
    )
    assert renamed["passed"] is False and "in one only" in renamed["checks"][-1]["detail"]


def test_the_qwen3_1_7b_shape_is_the_benchs_published_one_and_builds_tied_in_bf16(tmp_path) -> None:
    from unsloth_qwen_compat.bench import SHAPES

    published = SHAPES["qwen3-1.7b"]
    shape = grpo.SHAPES["qwen3-1.7b"]
    assert (
        shape["layers"], shape["hidden_size"], shape["heads"], shape["kv_heads"], shape["head_dim"],
        shape["intermediate_size"], shape["tie_word_embeddings"],
    ) == (
        published.num_hidden_layers, published.hidden_size, published.num_attention_heads,
        published.num_key_value_heads, published.head_dim, published.intermediate_size,
        published.tie_word_embeddings,
    )  # fmt: skip
    # The same builder, at the tiny size: tied embeddings, bf16 weights.
    import sys

    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO / "examples"))
    from tiny_qwen import build_tiny_qwen

    directory = build_tiny_qwen(tmp_path / "c", tie_word_embeddings=True, dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}


def test_compare_paths_runs_both_paths_at_once_and_records_each(tmp_path) -> None:
    """The plumbing of --compare-paths on CPU: its check for CUDA is passed once in the
    parent, so the hf child trains (fp32) and the unsloth child stops at the loader's CUDA
    check; the summary records both and fails."""
    code = f"""
import argparse, importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("grpo_trl", {str(EXAMPLE)!r})
grpo = importlib.util.module_from_spec(spec); spec.loader.exec_module(grpo)
answers = iter([True])  # compare_paths' own check only; torch's later ones see the CPU
torch.cuda.is_available = lambda: next(answers, False)
args = argparse.Namespace(out={str(tmp_path)!r}, loop="custom", steps=3, precision="fp32",
                          checkpoint=None, shape="tiny")
from pathlib import Path
args.out = Path(args.out)
sys.exit(grpo.compare_paths(args))
"""
    done = run_python(code, timeout=300)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "grpo.json").read_text())
    checks = {check["name"]: check["passed"] for check in summary["checks"]}
    assert checks["hf run passed its own checks"] is True
    assert checks["unsloth run passed its own checks"] is False
    assert "no CUDA GPU" in (tmp_path / "unsloth.log").read_text()
    assert json.loads((tmp_path / "hf" / "grpo.json").read_text())["passed"] is True
    assert (tmp_path / "hf" / grpo.FIRST_STEP_GRADS).is_file()
    assert summary["first_step"].keys() == {"hf"} and summary["loop"] == "custom"
