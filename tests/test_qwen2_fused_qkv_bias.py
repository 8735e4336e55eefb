"""The Qwen2 fused-QKV-with-bias patch: reading stock's gate, the numerics of the fused
function against PEFT (fp32, CPU), and which layers stock's real ``patch_peft_model`` plus
the shim hand the function (bf16, CPU; the model is never run end to end here)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from unsloth_qwen_compat.patches.qwen2_fused_qkv_bias import GateLayoutError, read_stock_gate

from .conftest import requires_unsloth, run_python

# -- stock's gate, read from stand-in sources laid out like each release's -------------------

_LAYER_GATE = """
            if hasattr(q_proj, "lora_A") and hasattr(k_proj, "lora_A") and hasattr(v_proj, "lora_A") and \\
                (getattr(q_proj, "base_layer", q_proj).bias is None) and \\
                (getattr(k_proj, "base_layer", k_proj).bias is None) and \\
                (getattr(v_proj, "base_layer", v_proj).bias is None) and \\
                (len(getattr(q_proj, "lora_magnitude_vector", []) or []) == 0) and \\
                (len(getattr(k_proj, "lora_magnitude_vector", []) or []) == 0) and \\
                (len(getattr(v_proj, "lora_magnitude_vector", []) or []) == 0):
                layer.self_attn.apply_qkv = apply_lora_qkv
"""

# Stand-in for 2025.3.19 / 2025.10.12: dropout and LoRA bias around the loop.
STAND_IN_2025 = (
    """
def patch_peft_model(model, use_gradient_checkpointing=True):
    lora_dropout = model.peft_config[active_adapter].lora_dropout
    bias = model.peft_config[active_adapter].bias
    if lora_dropout == 0 and bias == "none":
        for idx, layer in enumerate(model.model.model.layers):
            q_proj = layer.self_attn.q_proj
            k_proj = layer.self_attn.k_proj
            v_proj = layer.self_attn.v_proj
"""
    + _LAYER_GATE
)

# Stand-in for 2026.x: also fp32 bases and a helper predicate from the module's globals.
STAND_IN_2026 = """
def patch_peft_model(model, use_gradient_checkpointing="unsloth"):
    float32_base = (_base_weight_dtype(model.model.model.layers[0].self_attn.q_proj) == "float32")
    if (lora_dropout == 0 or FUSED_LORA_DROPOUT) and bias == "none" and not float32_base:
        for idx, layer in enumerate(model.model.model.layers):
            q_proj = layer.self_attn.q_proj
            k_proj = layer.self_attn.k_proj
            v_proj = layer.self_attn.v_proj
""" + _LAYER_GATE.replace(
    ":\n                layer", " and not is_packed(q_proj, k_proj, v_proj):\n                layer"
)

NAMESPACE_2026 = {
    "_base_weight_dtype": lambda proj: proj.base_layer.dtype,
    "FUSED_LORA_DROPOUT": True,
    "is_packed": lambda *projs: any(getattr(p, "packed", False) for p in projs),
    "apply_lora_qkv": object(),
}


def _proj(bias=0.5, lora=True, dora=False, dtype="bfloat16", packed=False):
    proj = SimpleNamespace(base_layer=SimpleNamespace(bias=bias, dtype=dtype), packed=packed)
    if lora:
        proj.lora_A = {"default": None}
    proj.lora_magnitude_vector = {"default": None} if dora else {}
    return proj


def _attention(**kwargs):
    v_kwargs = kwargs.pop("v", {})
    return SimpleNamespace(
        q_proj=_proj(**kwargs), k_proj=_proj(**kwargs), v_proj=_proj(**{**kwargs, **v_kwargs})
    )


def _model(dropout=0.0, bias="none", dtype="bfloat16"):
    layer = SimpleNamespace(self_attn=_attention(dtype=dtype))
    return SimpleNamespace(
        active_adapters=["default"],
        peft_config={"default": SimpleNamespace(lora_dropout=dropout, bias=bias)},
        config=SimpleNamespace(model_type="qwen2"),
        model=SimpleNamespace(model=SimpleNamespace(layers=[layer])),
    )


def test_2025_gate_is_mirrored_without_its_bias_clauses() -> None:
    gate = read_stock_gate(None, {"apply_lora_qkv": object()}, source=STAND_IN_2025)
    assert gate.bias_clauses == 3  # the probe's "needed"
    assert gate.assigned == {}
    assert gate.model_open(_model())
    assert not gate.model_open(_model(dropout=0.1))  # 2025.x fuses no dropout
    assert not gate.model_open(_model(bias="all"))
    assert gate.layer_open(_attention())  # biased q/k/v pass once the bias clauses are gone
    assert gate.layer_open(_attention(bias=None))
    assert not gate.layer_open(_attention(dora=True))
    assert not gate.layer_open(_attention(v={"lora": False}))  # no LoRA on v_proj


def test_2026_gate_evaluates_stocks_own_assignment_and_helpers() -> None:
    gate = read_stock_gate(None, NAMESPACE_2026, source=STAND_IN_2026)
    assert gate.bias_clauses == 3
    assert set(gate.assigned) == {"float32_base"}
    assert gate.model_open(_model(dropout=0.1))  # fused dropout (FUSED_LORA_DROPOUT)
    assert not gate.model_open(_model(dtype="float32"))  # stock keeps fp32 bases on PEFT
    assert gate.layer_open(_attention())
    assert not gate.layer_open(_attention(v={"packed": True}))  # the module's own predicate


def test_a_gate_without_bias_clauses_reads_as_native() -> None:
    source = STAND_IN_2025.replace('getattr(q_proj, "base_layer", q_proj).bias is None', "True")
    source = source.replace('getattr(k_proj, "base_layer", k_proj).bias is None', "True")
    source = source.replace('getattr(v_proj, "base_layer", v_proj).bias is None', "True")
    assert read_stock_gate(None, {}, source=source).bias_clauses == 0


def _stand_in_peft_forward(self, X):  # what a fused path that adds the biases computes
    return self.q_proj(X), self.k_proj(X), self.v_proj(X)


def _stand_in_bias_dropped(self, X):  # a fused path that leaves the base biases out
    return tuple(
        getattr(self, n)(X) - getattr(self, n).base_layer.bias for n in ("q_proj", "k_proj", "v_proj")
    )


def test_the_bias_check_runs_the_fused_path_on_biased_qkv() -> None:
    pytest.importorskip("peft")
    from unsloth_qwen_compat.patches.qwen2_fused_qkv_bias import _BIAS_CHECK_TOLERANCE, fused_qkv_bias_error

    assert fused_qkv_bias_error(_stand_in_peft_forward) == 0.0
    assert fused_qkv_bias_error(_stand_in_bias_dropped) > 100 * _BIAS_CHECK_TOLERANCE


def _gate_free_llama(apply_lora_qkv):
    """A stand-in unsloth.models.llama whose patch_peft_model fuses q/k/v whatever their bias."""
    from types import ModuleType

    source = STAND_IN_2025
    for name in ("q_proj", "k_proj", "v_proj"):
        source = source.replace(f'(getattr({name}, "base_layer", {name}).bias is None) and', "")
    namespace: dict = {}
    exec(compile(source, "<stand-in patch_peft_model>", "exec"), namespace)  # noqa: S102
    module = ModuleType("stand_in_llama")

    class FastLlamaModel:
        patch_peft_model = staticmethod(namespace["patch_peft_model"])

    module.FastLlamaModel, module.apply_lora_qkv = FastLlamaModel, apply_lora_qkv
    module.LlamaAttention_fast_forward = None  # read by the layout checks, which the test stubs
    return module, source


@pytest.mark.parametrize(
    ("apply_lora_qkv", "verdict"), [(_stand_in_peft_forward, "native"), (_stand_in_bias_dropped, "needed")]
)
def test_a_gate_without_bias_clauses_is_native_only_if_the_biases_are_added(
    apply_lora_qkv, verdict, monkeypatch
) -> None:
    pytest.importorskip("peft")
    from unsloth_qwen_compat.patches import qwen2_fused_qkv_bias as patch_module

    llama, source = _gate_free_llama(apply_lora_qkv)
    # The probe's layout checks (Unsloth's kernel, attention forward, Qwen2's pre_patch) pass here:
    # this test is about its last two steps, the gate and the bias check.
    monkeypatch.setattr(patch_module, "_missing", lambda *_: [])
    monkeypatch.setattr(patch_module, "_kernel_layout_problem", lambda _: "")
    monkeypatch.setattr(patch_module, "_calls", lambda *_: True)
    qwen2 = SimpleNamespace(FastQwen2Model=SimpleNamespace(pre_patch=lambda: None))
    monkeypatch.setattr(patch_module, "import_unsloth", lambda *_: qwen2)
    monkeypatch.setattr(patch_module, "code_mentions", lambda *_, **__: True)
    monkeypatch.setattr(patch_module, "_stock_gate", lambda f: read_stock_gate(None, {}, source=source))
    result = patch_module.Qwen2FusedQkvBias().probe(llama, None)
    assert result.verdict.value == verdict, result.reason
    if verdict == "needed":
        assert not result.fixable and "biases are dropped" in result.reason


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("hasattr(q_proj", "hasattr(o_proj"), "per-layer gate reads ['o_proj']"),
        (('bias == "none"', 'bias == "none" and not use_fsdp'), "around the layer loop reads ['use_fsdp']"),
        (("apply_qkv = apply_lora_qkv", "apply_qkv = apply_lora_qkv_v2"), "found 0"),
        (('(getattr(q_proj, "base_layer", q_proj).bias is None)', "not q_proj.bias"), "tests the bias as"),
        (
            ("                layer.self_attn.apply_qkv = apply_lora_qkv\n", "                pass\n"),
            "found 0",
        ),
    ],
)
def test_a_gate_it_cannot_mirror_is_a_layout_error(edit, message) -> None:
    with pytest.raises(GateLayoutError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_stock_gate(None, {}, source=STAND_IN_2025.replace(*edit))


def test_installing_in_an_else_branch_is_a_layout_error() -> None:
    source = STAND_IN_2025.replace(
        "                layer.self_attn.apply_qkv = apply_lora_qkv\n",
        "                pass\n            else:\n                layer.self_attn.apply_qkv = apply_lora_qkv\n",
    )
    with pytest.raises(GateLayoutError, match="else branch"):
        read_stock_gate(None, {}, source=source)


# -- numerics: the shim's function vs PEFT's modules, fp32 on CPU ----------------------------

NUMERICS = """
    import json, torch, transformers, peft
    import unsloth_qwen_compat  # imports Unsloth's GPU code (UNSLOTH_ALLOW_CPU=1)
    from unsloth_qwen_compat.patches.qwen2_fused_qkv_bias import apply_lora_qkv_with_bias
    from tests.conftest import tiny_qwen_config

    def rel(a, b):
        a, b = a.detach().double(), b.detach().double()
        return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_qwen_config("qwen2")).float()
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(attention, name).bias.normal_(0.0, 0.5)  # HF initialises them to zero
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none",
                             target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    attention = model.base_model.model.model.layers[0].self_attn
    projections = [attention.q_proj, attention.k_proj, attention.v_proj]
    lora = {f"{n}.{p}": getattr(getattr(attention, n), p)["default"].weight
            for n in ("q_proj", "k_proj", "v_proj") for p in ("lora_A", "lora_B")}
    assert all(w.abs().sum() > 0 for w in lora.values())  # random, non-zero B
    X = torch.randn(2, 7, 32)
    upstream = [torch.randn(2, 7, p.base_layer.out_features) for p in projections]

    def run(project, bias_grad):
        for p in projections:
            p.base_layer.bias.requires_grad_(bias_grad)
        model.zero_grad(set_to_none=True)
        x = X.clone().requires_grad_(True)
        outputs = project(x.clone())  # the fused backward writes dX into its input
        sum((o * g).sum() for o, g in zip(outputs, upstream)).backward()
        grads = {"dX": x.grad, **{k: w.grad for k, w in lora.items()}}
        if bias_grad:
            grads.update({f"bias{i}": p.base_layer.bias.grad for i, p in enumerate(projections)})
        return outputs, grads

    peft_path = lambda x: (attention.q_proj(x), attention.k_proj(x), attention.v_proj(x))
    shim_path = lambda x: apply_lora_qkv_with_bias(attention, x)
    result = {}
    for bias_grad in (False, True):
        (ref, ref_grads), (out, out_grads) = run(peft_path, bias_grad), run(shim_path, bias_grad)
        node = out[0].grad_fn.next_functions[0][0]
        result[f"bias_grad={bias_grad}"] = {
            "outputs": {n: rel(o, r) for n, o, r in zip("QKV", out, ref)},
            "grads": {k: rel(out_grads[k], ref_grads[k]) for k in ref_grads},
            "kernel": type(node).__name__,
        }
    # Unsloth 2026.x compiles each decoder layer: the function must give the same under Dynamo.
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: apply_lora_qkv_with_bias(attention, x), backend="aot_eager")
    (ref, ref_grads), (out, out_grads) = run(peft_path, False), run(compiled, False)
    result["compiled"] = max([rel(o, r) for o, r in zip(out, ref)] +
                             [rel(out_grads[k], ref_grads[k]) for k in ref_grads])
    with torch.no_grad():  # no backward: PEFT's modules, biases included
        result["no_grad"] = max(rel(o, r) for o, r in zip(shim_path(X), peft_path(X)))
    def kernel_ran(t, depth=4):
        nodes = [t.grad_fn]
        for _ in range(depth):
            if any(type(n).__name__ == "LoRA_QKVBackward" for n in nodes):
                return True
            nodes = [m for n in nodes if n is not None for m, _ in n.next_functions]
        return False

    # Active LoRA dropout: PEFT's forward (not comparable numerically: random masks).
    attention.v_proj.lora_dropout["default"] = torch.nn.Dropout(0.1)
    result["dropout_kernel"] = kernel_ran(run(shim_path, False)[0][0])
    attention.v_proj.lora_dropout["default"] = torch.nn.Identity()
    # A trainable base weight is outside the kernel's reach: PEFT's forward, which already
    # adds the bias (the shim must not add it again).
    attention.k_proj.base_layer.weight.requires_grad_(True)
    (ref, _), (out, _) = run(peft_path, False), run(shim_path, False)
    result["fallback"] = {"rel": max(rel(o, r) for o, r in zip(out, ref)), "kernel": kernel_ran(out[0])}
    print(json.dumps(result))
"""

#: fp32 on both sides, same weights: only summation order differs (measured ~1e-7).
FP32_REL = 1e-5


@requires_unsloth
def test_fused_function_matches_peft_in_fp32() -> None:
    done = run_python(NUMERICS, env={"UNSLOTH_ALLOW_CPU": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for case in ("bias_grad=False", "bias_grad=True"):
        measured = out[case]
        assert measured["kernel"] == "LoRA_QKVBackward", measured  # Unsloth's fused Function ran
        errors = {**measured["outputs"], **measured["grads"]}
        assert len(measured["grads"]) == (10 if case.endswith("True") else 7)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= FP32_REL, f"{case}: {worst} rel {errors[worst]:.3g}; all {errors}"
    assert out["no_grad"] <= FP32_REL
    assert out["compiled"] <= FP32_REL  # the same under torch.compile (no autograd-node sniffing)
    assert out["dropout_kernel"] is False
    assert out["fallback"]["kernel"] is False  # PEFT's forward ran
    assert out["fallback"]["rel"] <= FP32_REL  # ... and the bias was not added twice


# -- wiring: stock's real patch_peft_model, then the shim ------------------------------------

WIRING = """
    import json, os, torch, transformers, peft
    import unsloth_qwen_compat as shim
    import unsloth.models.llama as llama
    from unsloth.models.qwen2 import FastQwen2Model
    from unsloth.kernels.fast_lora import apply_lora_qkv
    from unsloth_qwen_compat.patches.qwen2_fused_qkv_bias import apply_lora_qkv_with_bias
    from tests.conftest import TINY_QWEN

    # Stand-in for what from_pretrained sets up on a GPU: Unsloth's Trainer patch (checked by
    # name in patch_peft_model) and the per-layer projection functions.
    from transformers.trainer import Trainer
    Trainer._inner_training_loop.__name__ = "_fast_inner_training_loop"
    ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def build(model_type="qwen2", dtype=torch.bfloat16, drop_bias=False):
        config = transformers.AutoConfig.for_model(model_type, **{**TINY_QWEN, "num_hidden_layers": 2})
        model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
        model.max_seq_length = 64
        for layer in model.model.layers:
            layer.self_attn.apply_qkv, layer.self_attn.apply_o = llama.original_apply_qkv, llama.original_apply_o
            if drop_bias:
                for name in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, name).bias = None
        return model

    def lora(model, targets=ALL, **kwargs):
        config = peft.LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=targets,
                                 **{"lora_dropout": 0.0, **kwargs})
        return peft.get_peft_model(model, config)

    def kinds(model):
        names = {apply_lora_qkv: "stock", apply_lora_qkv_with_bias: "shim", llama.original_apply_qkv: "peft"}
        return [names.get(l.self_attn.apply_qkv, "other") for l in model.base_model.model.model.layers]

    # Models first: Unsloth's rotary embedding (installed by pre_patch) wants CUDA to build.
    cases = {
        "default": lambda: lora(build()),
        "lora_dropout": lambda: lora(build(), lora_dropout=0.1),
        "dora": lambda: lora(build(), use_dora=True),
        "no_lora_on_v": lambda: lora(build(), targets=["q_proj", "k_proj", "o_proj"]),
        "lora_bias_all": lambda: lora(build(), bias="all"),
        "fp32_base": lambda: lora(build(dtype=torch.float32)),
        "no_qkv_bias": lambda: lora(build(drop_bias=True)),
        "qwen3": lambda: lora(build("qwen3")),
        "after_revert": lambda: lora(build()),
    }
    models = {name: make() for name, make in cases.items()}
    FastQwen2Model.pre_patch()  # Qwen2Attention.forward = LlamaAttention_fast_forward

    entry = lambda: next(p for p in shim.status()["patches"] if p["name"] == "qwen2_fused_qkv_bias")
    owners = {"patch_peft_model": llama.FastLlamaModel.__dict__, "_fused_lora_modules": vars(llama),
              "_decline_fused_lora_for_fsdp": vars(llama)}
    current = lambda: {name: owner[name] for name, owner in owners.items()}
    shim.revert(["qwen2_fused_qkv_bias"])  # stock's objects, then apply again
    stock = current()
    shim.apply(["qwen2_fused_qkv_bias"])
    changed = {name: value is not stock[name] for name, value in current().items()}
    out = {"entry": entry(), "kinds": {}, "changed": changed}
    for name, model in models.items():
        if name == "after_revert":
            continue
        llama.FastLlamaModel.patch_peft_model(model, use_gradient_checkpointing=False)
        out["kinds"][name] = kinds(model)
        if name == "default":
            out["detail"] = entry()["detail"]
    default = models["default"]
    fused_attention = [l.self_attn for l in default.base_model.model.model.layers]
    listed = llama._fused_lora_modules(default)
    out["fsdp2_lists_them"] = all(any(m is a for m in listed) for a in fused_attention)

    shim.revert(["qwen2_fused_qkv_bias"])
    out["restored"] = {name: value is stock[name] for name, value in current().items()}
    out["function_restored"] = llama.FastLlamaModel.patch_peft_model is stock["patch_peft_model"].__func__
    out["kept_after_revert"] = kinds(default)
    llama.FastLlamaModel.patch_peft_model(models["after_revert"], use_gradient_checkpointing=False)
    out["kinds"]["after_revert"] = kinds(models["after_revert"])
    shim.apply(["qwen2_fused_qkv_bias"])
    declined = llama._decline_fused_lora_for_fsdp(default, "a test")
    out["after_fsdp_decline"] = kinds(default)
    out["declined"] = declined
    print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def wiring() -> dict:
    done = run_python(WIRING, env={"UNSLOTH_ALLOW_CPU": "1"})  # the patch's default: on
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"_stderr": done.stderr}


@requires_unsloth
def test_probe_says_needed_and_the_patch_applies(wiring) -> None:
    entry = wiring["entry"]
    assert (entry["verdict"], entry["action"]) == ("needed", "applied"), entry
    assert "gated on q/k/v having no bias" in entry["reason"]


@requires_unsloth
def test_every_qwen2_layer_gets_the_fused_function_and_says_so(wiring) -> None:
    assert wiring["kinds"]["default"] == ["shim", "shim"]
    assert "apply_lora_qkv_with_bias fused 2 of 2 Qwen2 layers" in wiring["detail"]
    assert "apply_lora_qkv_with_bias fused 2 of 2 Qwen2 layers" in wiring["_stderr"]  # the log line


@requires_unsloth
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("lora_dropout", ["shim", "shim"]),  # 2026.x fuses dropout (stock gate: FUSED_LORA_DROPOUT)
        ("dora", ["peft", "peft"]),
        ("no_lora_on_v", ["peft", "peft"]),
        ("lora_bias_all", ["peft", "peft"]),
        ("fp32_base", ["peft", "peft"]),  # 2026.x keeps fp32 bases on PEFT, fused or not
        ("no_qkv_bias", ["stock", "stock"]),  # stock's own kernel, the shim stays out
        ("qwen3", ["stock", "stock"]),  # not Qwen2: untouched
    ],
)
def test_layers_stock_would_not_fuse_but_for_the_bias_are_left_alone(wiring, case, expected) -> None:
    assert wiring["kinds"][case] == expected


@requires_unsloth
def test_revert_restores_by_identity_and_patched_models_keep_their_function(wiring) -> None:
    assert all(wiring["changed"].values()), wiring["changed"]
    assert all(wiring["restored"].values()), wiring["restored"]
    assert wiring["function_restored"]
    assert wiring["kept_after_revert"] == ["shim", "shim"]  # documented: models keep the function
    assert wiring["kinds"]["after_revert"] == ["peft", "peft"]  # stock again


@requires_unsloth
def test_fsdp_bookkeeping_sees_the_shims_layers(wiring) -> None:
    assert wiring["fsdp2_lists_them"]
    assert wiring["after_fsdp_decline"] == ["peft", "peft"]
    assert wiring["declined"] >= 2


@requires_unsloth
def test_applies_on_top_of_another_patches_wrapper() -> None:
    # On 2025.3 qwen3_registration wraps patch_peft_model first; this patch must still read
    # stock's gate (through __wrapped__) and wrap the wrapper, not step aside.
    done = run_python(
        """
        import functools, json
        import unsloth.models.llama as llama
        stock = llama.FastLlamaModel.patch_peft_model
        @functools.wraps(stock)
        def other_patch(*args, **kwargs):
            return stock(*args, **kwargs)
        other_patch.__unsloth_qwen_compat__ = True
        llama.FastLlamaModel.patch_peft_model = staticmethod(other_patch)
        import unsloth_qwen_compat as shim
        entry = {p["name"]: p for p in shim.status()["patches"]}["qwen2_fused_qkv_bias"]
        top = llama.FastLlamaModel.patch_peft_model
        print(json.dumps({"action": entry["action"], "wraps_other": top.__wrapped__ is other_patch}))
        """,
        env={"UNSLOTH_ALLOW_CPU": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"action": "applied", "wraps_other": True}, out


# -- on by default, UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS=0 switches it off ------------------------

SWITCH = """
    import inspect, json, warnings
    import unsloth.models.llama as llama  # first: its objects as stock left them

    NAMES = ("patch_peft_model", "_fused_lora_modules", "_decline_fused_lora_for_fsdp")
    def current():
        owners = {"patch_peft_model": llama.FastLlamaModel.__dict__}
        return {n: owners.get(n, vars(llama)).get(n) for n in NAMES}

    stock = current()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import unsloth_qwen_compat as shim
    entry = next(p for p in shim.status()["patches"] if p["name"] == "qwen2_fused_qkv_bias")
    print(json.dumps({
        "entry": entry,
        "unchanged": {n: v is stock[n] for n, v in current().items() if stock[n] is not None},
        "applied": shim.shim().applied(),
        "notes": shim.status()["notes"],
        "warnings": [str(w.message) for w in caught if "FUSED_QKV_BIAS" in str(w.message)],
    }))
"""


@requires_unsloth
@pytest.mark.parametrize("value", [None, "0", "Off", "fused"])
def test_on_by_default_and_switched_off_by_its_variable(value) -> None:
    env = {"UNSLOTH_ALLOW_CPU": "1"}
    if value is not None:
        env["UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS"] = value
    done = run_python(SWITCH, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    entry, unchanged = out["entry"], out["unchanged"]
    assert entry["verdict"] == "needed", entry
    assert unchanged["patch_peft_model"] is not None
    notes = [n for n in out["notes"] if n.startswith("qwen2_fused_qkv_bias")]
    if value in ("0", "Off"):
        assert entry["action"] == "switched off", entry
        assert entry["detail"] == (
            f"switched off by UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS={value}: unset it (or set it to 1) to apply"
        )
        assert all(unchanged.values()), unchanged  # Unsloth's own functions, untouched
        assert "qwen2_fused_qkv_bias" not in out["applied"]
        assert notes == [f"qwen2_fused_qkv_bias {entry['detail']}"]  # status says so, and how back
        assert out["warnings"] == []  # the user's choice, not a problem
    else:  # unset, or not an on/off value: the default, on
        assert entry["action"] == "applied", entry
        assert not unchanged["patch_peft_model"]
        assert "qwen2_fused_qkv_bias" in out["applied"]
        assert notes == []
        if value is None:
            assert out["warnings"] == []
        else:
            assert len(out["warnings"]) == 1, out["warnings"]
            assert "UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS='fused' is not an on/off value" in out["warnings"][0]
            assert "using the default (on)" in out["warnings"][0]
