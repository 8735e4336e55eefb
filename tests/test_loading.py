"""The HF-or-Unsloth loader: config schema, path choice, the HF path on a tiny local Qwen3,
LoRA parity settings, generation mode and the adapter-disabled reference.

The HF path runs in-process. Unsloth cannot load a model without a GPU, so its path is
covered here by its call arguments (a recording stand-in for FastLanguageModel) and by
a child process that checks the installed Unsloth still takes them; the real thing runs
in ``examples/gpu_parity.py`` on a GPU.
"""

from __future__ import annotations

import copy
import importlib.util
import types
import warnings
from pathlib import Path

import pytest
import torch

from unsloth_qwen_compat import _env, loading
from unsloth_qwen_compat.loading import (
    ConfigError,
    LoaderConfig,
    LoaderWarning,
    UnslothUnavailableError,
    adapter_disabled,
    attach_lora,
    count_trainable_parameters,
    framework_of,
    generate_replies,
    generation_mode,
    load_base_model,
    load_info,
    reference_logits,
)
from unsloth_qwen_compat.lora_targets import UnknownTargetModuleError

from .conftest import REPO, requires_unsloth, run_python, tiny_qwen_config

HAS_CUDA = torch.cuda.is_available()
cpu_only = pytest.mark.skipif(
    HAS_CUDA, reason="a CUDA GPU is present: this case is about machines without one"
)


def _load_example_module(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_qwen = _load_example_module("tiny_qwen")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen.build_tiny_qwen(tmp_path_factory.mktemp("tiny-qwen3"))


def _config(checkpoint: Path, **model: object) -> dict:
    return {
        "model": {"name": str(checkpoint), "load_in_4bit": False, **model},
        "data": {"max_length": 64, "train_file": "not the loader's business.jsonl"},
        "lora": {"r": 4, "alpha": 8},
        "training": {"learning_rate": 1e-4},
    }


def _checkpointing_flags(model: torch.nn.Module) -> list[bool]:
    return [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]


@pytest.fixture
def lora_model(checkpoint: Path):
    config = _config(checkpoint)
    model, tokenizer = load_base_model(config)
    return attach_lora(model, config), tokenizer


# --------------------------------------------------------------------------------------
# The config schema


def test_defaults() -> None:
    cfg = LoaderConfig.from_mapping({"model": {"name": "Qwen/Qwen3-8B"}, "data": {"max_length": 512}})
    assert cfg.requested_framework == "hf"
    assert (cfg.model.load_in_4bit, cfg.model.bnb_4bit_quant_type, cfg.model.bnb_4bit_use_double_quant) == (
        True,
        "nf4",
        True,
    )
    assert (cfg.model.dtype, cfg.model.bnb_4bit_compute_dtype, cfg.model.gradient_checkpointing) == (
        "auto",
        None,
        True,
    )
    assert (cfg.model.allow_hf_fallback, cfg.model.attn_implementation) == (False, "sdpa")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.bias, cfg.lora.target_modules) == (
        16,
        16,
        0.0,
        "none",
        None,
    )
    assert cfg.data.max_length == 512


def test_sections_of_the_training_repo_are_left_alone() -> None:
    cfg = LoaderConfig.from_mapping(
        {
            "model": {"name": "m"},
            "data": {"max_length": 8, "train_file": "a.jsonl", "shuffle": True},
            "training": {"lr": 1e-4},
            "grpo": {"beta": 0.04},
        }
    )
    assert cfg.data.max_length == 8


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model": {"use_unslot": True}}, "model.use_unslot: unknown key; did you mean model.use_unsloth?"),
        ({"lora": {"lora_alpha": 32}}, "lora.lora_alpha: unknown key; did you mean lora.alpha?"),
        ({"model": {"quant": "nf4"}}, "model.quant: unknown key"),
        ({"lroa": {"r": 8}}, "lroa: unknown section; did you mean lora?"),
        ({"data": {"max_lenght": 512}}, "data.max_lenght: unknown key; did you mean data.max_length?"),
    ],
)
def test_unknown_keys_are_named(config: dict, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        LoaderConfig.from_mapping(config)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model": {"load_in_4bit": "yes"}}, "model.load_in_4bit: expected true/false, got 'yes'"),
        ({"model": {"use_unsloth": 1}}, "model.use_unsloth: expected true/false or null, got 1"),
        ({"lora": {"r": "8"}}, "lora.r: expected an integer, got '8'"),
        ({"lora": {"r": True}}, "lora.r: expected an integer, got True"),
        ({"lora": {"r": 0}}, "lora.r: must be a positive integer"),
        ({"lora": {"dropout": "0.1"}}, "lora.dropout: expected a number"),
        ({"lora": {"dropout": 1.5}}, "lora.dropout: must be in [0, 1)"),
        ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules: expected a list of strings or null"),
        ({"lora": {"target_modules": ["q_proj", 3]}}, "lora.target_modules: expected a list of strings"),
        ({"lora": {"bias": "yes"}}, "lora.bias: expected one of none, all, lora_only"),
        (
            {"model": {"bnb_4bit_quant_type": "nf5"}},
            "model.bnb_4bit_quant_type: expected one of nf4, fp4, got 'nf5' (did you mean nf4?)",
        ),
        ({"model": {"dtype": "bf16"}}, "model.dtype: expected one of auto, bfloat16, float16, float32"),
        ({"data": {"max_length": 0}}, "data.max_length: must be a positive integer"),
        ({"model": "Qwen/Qwen3-8B"}, "model: expected a mapping, got str"),
    ],
)
def test_wrong_types_are_named(config: dict, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        LoaderConfig.from_mapping(config)
    assert message in str(raised.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as raised:
        LoaderConfig.from_mapping({"model": {"use_unslot": True, "load_in_4bit": "no"}, "lora": {"rr": 8}})
    assert len(raised.value.problems) == 3


def test_load_requires_name_and_max_length() -> None:
    with pytest.raises(ConfigError) as raised:
        load_base_model({"model": {"load_in_4bit": False}})
    assert [p.split(":")[0] for p in raised.value.problems] == ["model.name", "data.max_length"]


@pytest.mark.parametrize(
    ("use_unsloth", "framework", "expected"),
    [
        (None, None, "hf"),
        (True, None, "unsloth"),
        (False, None, "hf"),
        (None, "unsloth", "unsloth"),
        (None, "hf", "hf"),
        (True, "unsloth", "unsloth"),
        (False, "hf", "hf"),
        (True, "hf", "model.use_unsloth: true conflicts with model.framework: hf"),
        (False, "unsloth", "model.use_unsloth: false conflicts with model.framework: unsloth"),
        (None, "pytorch", "model.framework: expected one of hf, unsloth"),
    ],
)
def test_framework_and_use_unsloth(use_unsloth: bool | None, framework: str | None, expected: str) -> None:
    model = {k: v for k, v in {"use_unsloth": use_unsloth, "framework": framework}.items() if v is not None}
    if expected in ("hf", "unsloth"):
        assert LoaderConfig.from_mapping({"model": model}).requested_framework == expected
    else:
        with pytest.raises(ConfigError, match=expected):
            LoaderConfig.from_mapping({"model": model})


# --------------------------------------------------------------------------------------
# Choosing the path


def _environment(mode: str, gpu: bool, error: str | None = None) -> _env.Environment:
    return _env.Environment(
        python="CPython 3.11",
        platform="linux",
        versions={},
        gpu=_env.GpuInfo("NVIDIA H100", 1, "90", "12.8") if gpu else None,
        unsloth=_env.UnslothState(mode, error=error),
    )


@pytest.mark.parametrize(
    ("mode", "gpu", "reason"),
    [
        (_env.MODE_GPU, True, None),
        (_env.MODE_MISSING, True, "Unsloth is not installed (pip install unsloth)"),
        (_env.MODE_IMPORT_FAILED, True, "`import unsloth` failed (RuntimeError: CUDA driver too old)"),
        (_env.MODE_NOT_IMPORTED, True, "Unsloth was not imported in this process"),
        (_env.MODE_CPU_FALLBACK, False, "no CUDA GPU is visible (Unsloth cannot train on CPU)"),
        (_env.MODE_CPU_ALLOWED, False, "no CUDA GPU is visible (Unsloth cannot train on CPU)"),
        (_env.MODE_MISSING, False, "Unsloth is not installed (pip install unsloth)"),
    ],
)
def test_why_unsloth_is_unavailable(mode: str, gpu: bool, reason: str | None) -> None:
    error = "RuntimeError: CUDA driver too old" if mode == _env.MODE_IMPORT_FAILED else None
    assert loading.unsloth_unavailable_reason(_environment(mode, gpu, error)) == reason


@cpu_only
def test_use_unsloth_without_gpu_is_an_error_naming_cause_and_fix(checkpoint: Path) -> None:
    with pytest.raises(UnslothUnavailableError) as raised:
        load_base_model(_config(checkpoint, use_unsloth=True))
    assert str(raised.value) == (
        "model.use_unsloth is true but no CUDA GPU is visible (Unsloth cannot train on CPU); "
        "set model.use_unsloth: false or model.allow_hf_fallback: true"
    )
    with pytest.raises(UnslothUnavailableError, match="set model.framework: hf or model.allow_hf_fallback"):
        load_base_model(_config(checkpoint, framework="unsloth"))


@cpu_only
def test_use_unsloth_with_fallback_warns_and_loads_hf(checkpoint: Path) -> None:
    with pytest.warns(LoaderWarning, match="no CUDA GPU is visible.*loading on the Hugging Face path"):
        model, _ = load_base_model(_config(checkpoint, use_unsloth=True, allow_hf_fallback=True))
    assert type(model).__module__.startswith("transformers.models.qwen3")
    assert framework_of(model) == "hf"
    info = load_info(model)
    assert info is not None and (info.framework, info.requested_framework) == ("hf", "unsloth")


@cpu_only
def test_4bit_without_gpu_is_an_error(checkpoint: Path) -> None:
    with pytest.raises(RuntimeError, match="set model.load_in_4bit: false"):
        load_base_model(_config(checkpoint, load_in_4bit=True))


def test_ddp_places_the_model_on_the_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert loading.device_map_for_this_process() == {"": 3}
    assert chosen == [3]
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(RuntimeError, match="LOCAL_RANK=4 but only 4 CUDA device"):
        loading.device_map_for_this_process()


# --------------------------------------------------------------------------------------
# Same quantization, same checkpoint on both paths


def _parsed(**model: object) -> LoaderConfig:
    return LoaderConfig.from_mapping(
        {"model": {"name": "Qwen/Qwen3-8B", **model}, "data": {"max_length": 4096}}
    )


def test_quantization_config_follows_the_config() -> None:
    bnb = loading.quantization_config(
        _parsed(bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype="float16"),
        "qwen3",
    )
    assert bnb is not None
    assert (bnb.load_in_4bit, bnb.bnb_4bit_quant_type, bnb.bnb_4bit_use_double_quant) == (True, "fp4", False)
    assert bnb.bnb_4bit_compute_dtype == torch.float16
    assert bnb.llm_int8_skip_modules == ["lm_head"]
    moe = loading.quantization_config(_parsed(dtype="bfloat16"), "qwen3_moe")
    assert moe is not None and moe.bnb_4bit_compute_dtype == torch.bfloat16
    assert moe.llm_int8_skip_modules == ["lm_head", "mlp.gate"]
    assert loading.quantization_config(_parsed(load_in_4bit=False)) is None


def test_unsloth_gets_the_same_quantization_and_the_exact_checkpoint() -> None:
    cfg = _parsed(dtype="bfloat16")
    bnb = loading.quantization_config(cfg, "qwen3")
    kwargs = loading.unsloth_from_pretrained_kwargs(
        cfg, torch.bfloat16, bnb, {"": 1}, ["model_name", "use_exact_model_name"]
    )
    assert kwargs["quantization_config"] is bnb
    assert kwargs["model_name"] == "Qwen/Qwen3-8B"
    assert kwargs["use_exact_model_name"] is True
    assert (kwargs["max_seq_length"], kwargs["dtype"], kwargs["load_in_4bit"]) == (4096, torch.bfloat16, True)
    assert kwargs["device_map"] == {"": 1}
    assert kwargs["use_gradient_checkpointing"] == "unsloth"
    older = loading.unsloth_from_pretrained_kwargs(cfg, torch.bfloat16, bnb, None, ["model_name"])
    assert "use_exact_model_name" not in older and "device_map" not in older


@pytest.mark.parametrize(
    ("model", "expected"),
    [({}, "unsloth"), ({"offload_checkpoints": False}, True), ({"gradient_checkpointing": False}, False)],
)
def test_unsloth_checkpointing_mode_follows_the_config(model: dict, expected: object) -> None:
    # Unsloth's use_gradient_checkpointing: "unsloth" offloads to host memory, True is plain.
    kwargs = loading.unsloth_from_pretrained_kwargs(_parsed(**model), torch.bfloat16, None, None, [])
    mode = kwargs["use_gradient_checkpointing"]
    assert mode == expected and type(mode) is type(expected)  # True, not "unsloth" or 1


@requires_unsloth
def test_installed_unsloth_accepts_the_loader_arguments() -> None:
    # Its real (GPU) loader, imported on CPU: the argument names the loader relies on still exist.
    done = run_python(
        """
        import inspect
        from unsloth import FastLanguageModel
        load = inspect.signature(FastLanguageModel.from_pretrained).parameters
        peft = inspect.signature(FastLanguageModel.get_peft_model).parameters
        needed = ["model_name", "max_seq_length", "dtype", "load_in_4bit", "use_exact_model_name",
                  "device_map", "use_gradient_checkpointing", "trust_remote_code", "revision"]
        missing = [n for n in needed if n not in load]
        missing += [n for n in ["r", "target_modules", "lora_alpha", "lora_dropout", "bias",
                                "use_gradient_checkpointing", "random_state", "use_rslora"] if n not in peft]
        has_kwargs = any(p.kind is p.VAR_KEYWORD for p in load.values())
        print("MISSING", missing, "KWARGS", has_kwargs)
        """,
        env={"UNSLOTH_ALLOW_CPU": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MISSING [] KWARGS True" in done.stdout


# --------------------------------------------------------------------------------------
# The HF path on a tiny local Qwen3


def test_hf_path_loads_in_training_mode_with_checkpointing(checkpoint: Path) -> None:
    model, tokenizer = load_base_model(_config(checkpoint))
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.dtype == loading.resolve_dtype("auto")
    assert model.training and all(m.training for m in model.modules())
    assert model.is_gradient_checkpointing and all(_checkpointing_flags(model))
    assert model.config.use_cache is False
    assert (tokenizer.padding_side, tokenizer.model_max_length) == ("right", 64)
    assert tokenizer.pad_token == tiny_qwen.ENDOFTEXT
    assert framework_of(model) == "hf"


def test_attach_lora_counts_match_peft(lora_model) -> None:
    model, _ = lora_model
    trainable, _total = model.get_nb_trainable_parameters()
    assert count_trainable_parameters(model) == trainable
    # r * (in + out) per targeted Linear: all seven projections of both layers by default.
    config = model.config
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    hidden, inter = config.hidden_size, config.intermediate_size
    per_layer = (
        (hidden + q_out) + 2 * (hidden + kv_out) + (q_out + hidden) + 2 * (hidden + inter) + (inter + hidden)
    )
    assert trainable == 4 * per_layer * config.num_hidden_layers
    assert set(model.peft_config["default"].target_modules) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    assert model.peft_config["default"].lora_alpha == 8


def test_lora_settings_reach_peft_and_the_seed_fixes_the_init(checkpoint: Path) -> None:
    config = _config(checkpoint)
    config["lora"] = {"r": 2, "alpha": 4, "dropout": 0.05, "bias": "lora_only", "target_modules": ["q_proj"]}
    first = attach_lora(load_base_model(config)[0], config)
    second = attach_lora(load_base_model(config)[0], config)
    peft_config = first.peft_config["default"]
    assert (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout, peft_config.bias) == (
        2,
        4,
        0.05,
        "lora_only",
    )
    assert set(peft_config.target_modules) == {"q_proj"}
    a1 = [p for n, p in first.named_parameters() if "lora_A" in n]
    a2 = [p for n, p in second.named_parameters() if "lora_A" in n]
    assert a1 and all(torch.equal(x, y) for x, y in zip(a1, a2))


def test_typo_in_target_modules_is_an_error(checkpoint: Path) -> None:
    config = _config(checkpoint)
    config["lora"] = {"target_modules": ["q_proj", "v_porj"]}
    model, _ = load_base_model(config)
    with pytest.raises(UnknownTargetModuleError, match=r"\['v_porj'\] match nothing.*Valid names:.*v_proj"):
        attach_lora(model, config)


@pytest.mark.parametrize(
    ("lora", "dtype", "fused_dropout", "expected"),
    [
        ({}, "bfloat16", False, []),
        ({"dropout": 0.1}, "bfloat16", True, []),
        ({"dropout": 0.1}, "bfloat16", False, ["lora.dropout = 0.1"]),
        ({"bias": "all"}, "bfloat16", True, ["lora.bias = 'all'"]),
        ({}, "float32", True, ["dtype float32"]),
    ],
)
def test_unsloth_slow_path_reasons(lora: dict, dtype: str, fused_dropout: bool, expected: list[str]) -> None:
    section = LoaderConfig.from_mapping({"lora": lora}).lora
    reasons = loading.unsloth_slow_path_reasons(section, dtype, fused_dropout=fused_dropout)
    assert [r.split(" (")[0] for r in reasons] == expected


# --------------------------------------------------------------------------------------
# Generation inside the loss


def _flags(model: torch.nn.Module) -> tuple:
    return (
        [m.training for m in model.modules()],
        _checkpointing_flags(model),
        model.config.use_cache,
    )


def test_generation_mode_restores_training_flags_when_generation_raises(lora_model) -> None:
    model, _ = lora_model
    before = _flags(model)
    assert model.training and all(before[1]) and before[2] is False
    with pytest.raises(RuntimeError, match="sampling blew up"):
        with generation_mode(model):
            assert not model.training and not any(m.training for m in model.modules())
            assert model.config.use_cache is True
            raise RuntimeError("sampling blew up")
    assert _flags(model) == before


def test_generation_mode_returns_to_the_mode_it_found(lora_model) -> None:
    model, _ = lora_model
    model.eval()
    with generation_mode(model):
        pass
    assert not model.training and model.config.use_cache is False


def _layer_forwards_in_one_step(model: torch.nn.Module, batch: dict) -> int:
    """Calls of the first decoder MLP in forward + backward: 2 when checkpointing recomputes it.

    A pre-hook: torch stops the recompute once the last saved tensor is back, which can be
    inside the MLP, before any forward (post-)hook would run.
    """
    mlp = next(m for name, m in model.named_modules() if name.endswith("layers.0.mlp"))
    calls = []
    handle = mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        model(**batch, labels=batch["input_ids"]).loss.backward()
    finally:
        handle.remove()
    model.zero_grad(set_to_none=True)
    return len(calls)


def test_a_training_step_after_generation_is_checkpointed_again(lora_model) -> None:
    model, tokenizer = lora_model
    batch = dict(
        tokenizer(["The quick brown fox jumps", "A spider has eight legs"], return_tensors="pt", padding=True)
    )
    assert _layer_forwards_in_one_step(model, batch) == 2  # checkpointing recomputes the layer
    replies = generate_replies(
        model, tokenizer, ["What is the capital of France?"], 2, max_new_tokens=4, do_sample=True
    )
    assert len(replies.texts) == 1 and len(replies.texts[0]) == 2
    assert _layer_forwards_in_one_step(model, batch) == 2
    # The trap this guards against: left in eval mode, a step skips checkpointing.
    model.eval()
    assert _layer_forwards_in_one_step(model, batch) == 1


def test_generate_replies_restores_when_generate_raises(lora_model, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = lora_model
    before = _flags(model)

    def broken_generate(**_: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(model, "generate", broken_generate)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        generate_replies(model, tokenizer, ["hello"], 4)
    assert _flags(model) == before
    assert tokenizer.padding_side == "right"


def test_generate_replies_shapes_and_masks(lora_model, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = lora_model
    prompts = ["Hello", [{"role": "user", "content": "What is the capital of France?"}]]
    replies = generate_replies(
        model, tokenizer, prompts, num_return_sequences=3, max_new_tokens=5, do_sample=True
    )
    assert [len(group) for group in replies.texts] == [3, 3]
    assert replies.sequences.shape[0] == 6 == replies.attention_mask.shape[0]
    assert replies.completion_ids.shape == replies.completion_mask.shape
    assert replies.attention_mask.shape == replies.sequences.shape
    encoded = tokenizer(["Hello"], return_tensors="pt")
    assert replies.prompt_length >= encoded["input_ids"].shape[1]

    # The completion mask keeps each completion up to and including its first EOS.
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    def scripted_generate(input_ids: torch.Tensor, **_: object) -> torch.Tensor:
        rows = input_ids.repeat_interleave(2, dim=0)
        tail = torch.tensor([[5, eos, pad, pad], [5, 6, 7, 8]] * input_ids.shape[0])
        return torch.cat([rows, tail], dim=1)

    monkeypatch.setattr(model, "generate", scripted_generate)
    scripted = generate_replies(model, tokenizer, ["Hello"], num_return_sequences=2)
    assert scripted.completion_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_generated_ids_from_inference_mode_work_in_a_policy_loss(
    lora_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unsloth's generate runs under torch.inference_mode (here a stand-in for it does): the ids
    generate_replies hands back must still index log-probs in a loss that backpropagates."""
    model, tokenizer = lora_model
    real_generate = model.generate

    def inference_mode_generate(**kwargs: object) -> torch.Tensor:
        with torch.inference_mode():
            return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", inference_mode_generate)
    replies = generate_replies(model, tokenizer, ["Hello"], 2, max_new_tokens=3, do_sample=True)
    assert not replies.sequences.is_inference()
    logits = model(input_ids=replies.sequences, attention_mask=replies.attention_mask).logits
    targets = replies.sequences[:, 1:].unsqueeze(-1)
    loss = -torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets).mean()
    loss.backward()  # raised "Inference tensors cannot be saved for backward" before the copy
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------------------
# GRPO's reference model


def test_adapter_disabled_logits_equal_a_frozen_copy_of_the_base(checkpoint: Path) -> None:
    config = _config(checkpoint)
    base, tokenizer = load_base_model(config)
    frozen = copy.deepcopy(base).eval()
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    model = attach_lora(base, config)
    with torch.no_grad():  # a trained adapter: LoRA's B starts at zero, which would hide a bug
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    batch = dict(tokenizer(["The capital of France is Paris."], return_tensors="pt"))
    with torch.no_grad():
        expected = frozen(**batch).logits
        adapted = model(**batch).logits
        assert not torch.allclose(adapted, expected, atol=1e-3)
        with adapter_disabled(model):
            inside = model(**batch).logits
        after = model(**batch).logits
    torch.testing.assert_close(inside, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(after, adapted, rtol=0, atol=0)
    reference = reference_logits(model, **batch, labels=batch["input_ids"])
    assert not reference.requires_grad
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-6)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in base.parameters())


def test_adapter_disabled_needs_an_adapter(checkpoint: Path) -> None:
    model, _ = load_base_model(_config(checkpoint))
    with pytest.raises(TypeError, match="call attach_lora first"):
        with adapter_disabled(model):
            pass


# --------------------------------------------------------------------------------------
# The Unsloth path's calls, with a recording stand-in for FastLanguageModel


class _RecordingFastLanguageModel:
    """Records calls; loads and adapts with stock transformers / PEFT (Unsloth needs a GPU)."""

    def __init__(self, loaded_name: str | None = None) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.loaded_name = loaded_name

    def from_pretrained(self, model_name, max_seq_length=None, dtype=None, load_in_4bit=True,
                        use_exact_model_name=False, **kwargs):  # fmt: skip
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.calls.append(
            (
                "from_pretrained",
                dict(
                    model_name=model_name,
                    max_seq_length=max_seq_length,
                    dtype=dtype,
                    load_in_4bit=load_in_4bit,
                    use_exact_model_name=use_exact_model_name,
                    **kwargs,
                ),
            )  # fmt: skip
        )
        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype)
        if self.loaded_name:
            model.config._name_or_path = self.loaded_name
        model.eval()  # as Unsloth leaves it
        return model, AutoTokenizer.from_pretrained(model_name)

    def get_peft_model(self, model, **kwargs):
        from peft import LoraConfig, get_peft_model

        self.calls.append(("get_peft_model", kwargs))
        return get_peft_model(
            model,
            LoraConfig(
                r=kwargs["r"], lora_alpha=kwargs["lora_alpha"], target_modules=kwargs["target_modules"]
            ),
        )

    def for_inference(self, model):
        self.calls.append(("for_inference", {}))
        model.eval()

    def for_training(self, model, use_gradient_checkpointing=None):
        self.calls.append(("for_training", {}))
        model.train()


@pytest.fixture
def fake_unsloth(monkeypatch: pytest.MonkeyPatch) -> _RecordingFastLanguageModel:
    fake = _RecordingFastLanguageModel()
    monkeypatch.setattr(loading, "_fast_language_model", lambda: fake)
    monkeypatch.setattr(loading, "unsloth_unavailable_reason", lambda env=None: None)
    monkeypatch.setattr(loading, "_unsloth_fuses_dropout", lambda: False)
    return fake


def test_unsloth_path_keeps_checkpoints_on_the_card_when_asked(
    checkpoint: Path, fake_unsloth: _RecordingFastLanguageModel
) -> None:
    config = _config(checkpoint, use_unsloth=True, offload_checkpoints=False)
    model, _ = load_base_model(config)
    attach_lora(model, config)
    (_, loaded), (_, adapted) = fake_unsloth.calls[:2]
    assert loaded["use_gradient_checkpointing"] is True and adapted["use_gradient_checkpointing"] is True


def test_unsloth_path_calls(checkpoint: Path, fake_unsloth: _RecordingFastLanguageModel) -> None:
    config = _config(checkpoint, use_unsloth=True)
    model, _ = load_base_model(config)
    assert framework_of(model) == "unsloth"
    assert model.training  # Unsloth leaves eval mode; the loader does not
    name, kwargs = fake_unsloth.calls[0]
    assert name == "from_pretrained"
    assert kwargs["model_name"] == str(checkpoint) and kwargs["use_exact_model_name"] is True
    assert (kwargs["max_seq_length"], kwargs["load_in_4bit"], kwargs["use_gradient_checkpointing"]) == (
        64,
        False,
        "unsloth",
    )
    config["lora"] = {"r": 4, "alpha": 8, "dropout": 0.1}
    with pytest.warns(LoaderWarning, match="slow LoRA path.*lora.dropout = 0.1"):
        model = attach_lora(model, config)
    name, kwargs = fake_unsloth.calls[1]
    assert name == "get_peft_model"
    assert (kwargs["r"], kwargs["lora_alpha"], kwargs["lora_dropout"], kwargs["bias"]) == (4, 8, 0.1, "none")
    assert (kwargs["random_state"], kwargs["use_gradient_checkpointing"]) == (3407, "unsloth")
    assert framework_of(model) == "unsloth"
    with pytest.raises(ValueError, match="boom"):
        with generation_mode(model):
            raise ValueError("boom")
    assert [call[0] for call in fake_unsloth.calls[2:]] == ["for_inference", "for_training"]
    assert model.training


def test_unsloth_swapping_the_checkpoint_is_an_error(checkpoint: Path, fake_unsloth) -> None:
    fake_unsloth.loaded_name = "unsloth/Qwen3-8B-bnb-4bit"
    with pytest.raises(
        RuntimeError, match="Unsloth loaded 'unsloth/Qwen3-8B-bnb-4bit' instead of model.name"
    ):
        load_base_model(_config(checkpoint, use_unsloth=True))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="4-bit bitsandbytes loading needs a CUDA GPU")
def test_hf_path_4bit(checkpoint: Path) -> None:
    import bitsandbytes as bnb

    config = _config(checkpoint, load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model, _ = load_base_model(config)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(m.weight.quant_type == "nf4" for m in quantized)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)


def test_qwen3_moe_4bit_warns_that_the_paths_quantize_different_weights(tmp_path, monkeypatch) -> None:
    # Stand-ins: the 4-bit config and the HF load (4-bit needs a GPU); the warning comes first.
    config = tiny_qwen_config("qwen3_moe")
    config.save_pretrained(tmp_path)

    class StopLoading(Exception):
        pass

    def stop(*args: object, **kwargs: object) -> None:
        raise StopLoading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loading, "device_map_for_this_process", lambda: None)
    monkeypatch.setattr(loading, "quantization_config", lambda cfg, model_type=None: object())
    monkeypatch.setattr(loading, "_load_hf", stop)
    expected = 5 <= (loading.environment().transformers_major or 0)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(StopLoading):
        warnings.simplefilter("always")
        loading.load_base_model(_config(tmp_path, load_in_4bit=True, dtype="float32"))
    moe = [
        w for w in caught if issubclass(w.category, loading.LoaderWarning) and "Qwen3-MoE" in str(w.message)
    ]
    assert bool(moe) is expected


def test_unsloth_path_through_fastmodel(checkpoint: Path, fake_unsloth, monkeypatch) -> None:
    # model.unsloth_entry_point picks the class that loads, attaches LoRA and switches modes.
    entries = []
    monkeypatch.setattr(loading, "_unsloth_entry", lambda name: entries.append(name) or fake_unsloth)
    config = _config(checkpoint, use_unsloth=True, unsloth_entry_point="FastModel")
    model, _ = load_base_model(config)
    model = attach_lora(model, config)
    with generation_mode(model):
        pass
    assert entries == ["FastModel"] * 4
    assert [call[0] for call in fake_unsloth.calls] == [
        "from_pretrained",
        "get_peft_model",
        "for_inference",
        "for_training",
    ]
    with pytest.raises(loading.ConfigError, match="unsloth_entry_point"):
        load_base_model(_config(checkpoint, use_unsloth=True, unsloth_entry_point="FastVisionModel"))


def test_a_hybrid_qwen_model_this_transformers_lacks_is_refused_before_loading(tmp_path, monkeypatch) -> None:
    from unsloth_qwen_compat.patches import hybrid_qwen_models

    (tmp_path / "config.json").write_text('{"model_type": "qwen3_5_text"}')
    # A stand-in for transformers 4 (no Qwen3.5): the lookup reports the type missing.
    monkeypatch.setattr(hybrid_qwen_models, "types_transformers_lacks", lambda types: list(types))
    with pytest.raises(
        hybrid_qwen_models.UnsupportedModelTypeError, match="Qwen3.5 model .model_type qwen3_5_text"
    ):
        load_base_model(_config(tmp_path))
