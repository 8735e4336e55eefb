"""The RoPE contract and patch on CPU: plans, tables against transformers' own rotary embedding
for every type the installed transformers implements, gating, and the load-time wrapper.

The numerics of a real Unsloth load are checked on a GPU by conformance/test_rope_grid.py.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from unsloth_qwen_compat import rope_contract
from unsloth_qwen_compat.rope_contract import (
    EXTENDED,
    REFUSED,
    SAME,
    plan_rope,
    rope_scaling_of,
    rope_theta_of,
)

from .conftest import requires_unsloth, run_python

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

V5 = int(transformers.__version__.split(".")[0]) >= 5
WINDOW = 128
HEAD_DIM = 32
TINY = dict(
    hidden_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=HEAD_DIM,
    num_hidden_layers=1,
    intermediate_size=64,
    vocab_size=128,
    max_position_embeddings=WINDOW,
)

#: One scaling per type; a type the installed transformers adds later gets the generic recipe.
RECIPES = {
    "default": None,
    "linear": {"factor": 2.5},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 48,
    },
    "longrope": {
        "short_factor": [1.0 + i / 16 for i in range(HEAD_DIM // 2)],
        "long_factor": [2.0 + i / 8 for i in range(HEAD_DIM // 2)],
        "original_max_position_embeddings": 64,
    },
}
TYPES = ["default", *sorted(k for k in ROPE_INIT_FUNCTIONS if k != "default")]


def scaling_for(kind: str) -> dict | None:
    if kind == "default":
        return None
    return {"rope_type": kind, **RECIPES.get(kind, {"factor": 2.0})}


def qwen3_config(scaling: dict | None, theta: float = 1e6, model_type: str = "qwen3", **overrides):
    kwargs = {**TINY, **overrides}
    if scaling and scaling.get("rope_type") == "longrope" and not V5:
        kwargs["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    if V5:
        kwargs["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": theta}
    else:
        kwargs.update(rope_scaling=scaling, rope_theta=theta)
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def hf_cos_sin(config, length: int):
    """cos/sin of transformers' own Qwen3 rotary embedding for a forward of ``length`` tokens."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    positions = torch.arange(length)[None]
    cos, sin = Qwen3RotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
    return cos[0], sin[0]


def shim_cos_sin(config, length: int):
    from unsloth_qwen_compat.patches.rope_scaling import rope_cos_sin

    return rope_cos_sin(*rope_contract.rope_tables(config), length)


# -- reading configs ----------------------------------------------------------------------


def test_scaling_and_theta_read_on_both_layouts() -> None:
    yarn = {"rope_type": "yarn", "factor": 4.0}
    v4 = SimpleNamespace(rope_scaling=yarn, rope_theta=1e6, max_position_embeddings=320)
    v5 = SimpleNamespace(rope_parameters={**yarn, "rope_theta": 1e6}, max_position_embeddings=320)
    plain = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert rope_scaling_of(v4)["rope_type"] == rope_scaling_of(v5)["rope_type"] == "yarn"
    assert rope_scaling_of(plain) == {}
    assert rope_theta_of(v4) == rope_theta_of(v5) == 1e6
    assert (
        rope_scaling_of(SimpleNamespace(rope_scaling={"type": "linear", "factor": 2.0}))["rope_type"]
        == "linear"
    )


# -- tables: the shim's against transformers' rotary embedding, every type ----------------


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_tables_inside_the_window_equal_transformers_rotary(kind, theta) -> None:
    config = qwen3_config(scaling_for(kind), theta)
    length = WINDOW * 3 // 4
    if plan_rope(config, length).outcome == REFUSED:  # longrope: its switch is inside the window
        length = rope_contract.original_window(config)
    plan = plan_rope(config, length)
    assert plan.outcome == SAME
    built = rope_contract.build_config(config, plan)
    for mine, theirs in zip(shim_cos_sin(built, length), hf_cos_sin(config, length)):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", [k for k in TYPES if k not in ("default", "dynamic")])
def test_scaling_really_changes_the_table(kind) -> None:
    # Otherwise the equality above could not tell a scaled table from plain RoPE (dynamic NTK
    # is plain RoPE up to max_position_embeddings by design; its own test covers past it).
    config = qwen3_config(scaling_for(kind))
    plain = qwen3_config(None)
    cos, _ = shim_cos_sin(config, 64)
    plain_cos, _ = shim_cos_sin(plain, 64)
    assert (cos - plain_cos).abs().max() > 1e-3


@pytest.mark.parametrize("length", [WINDOW // 2, WINDOW, WINDOW + 1, 2 * WINDOW, 5 * WINDOW])
def test_dynamic_is_one_table_up_to_the_window_and_refused_past_it(length) -> None:
    config = qwen3_config(scaling_for("dynamic"))
    plan = plan_rope(config, length)
    reference = hf_cos_sin(config, length)
    init_table = shim_cos_sin(config, length)
    if length <= WINDOW:
        assert plan.outcome == SAME
        torch.testing.assert_close(init_table[0], reference[0], rtol=1e-6, atol=1e-6)
    else:
        # transformers recomputes the frequencies for this length: one table cannot follow.
        assert (init_table[0] - reference[0]).abs().max() > 1e-3
        assert plan.outcome == REFUSED
        assert f"past {WINDOW} tokens" in plan.reason and f"max_seq_length <= {WINDOW}" in plan.reason


@pytest.mark.parametrize("length", [32, 64, 65, 100, WINDOW, 3 * WINDOW])
def test_longrope_on_both_sides_of_its_switch(length) -> None:
    config = qwen3_config(scaling_for("longrope"))
    original = RECIPES["longrope"]["original_max_position_embeddings"]
    plan = plan_rope(config, length)
    reference = hf_cos_sin(config, length)
    init_table = shim_cos_sin(config, length)
    if length <= original:  # short factors at every length up to the switch
        assert plan.outcome == SAME
        torch.testing.assert_close(init_table[0], reference[0], rtol=1e-6, atol=1e-6)
    else:  # long factors for the whole sequence past it: refused, not trained on short ones
        assert (init_table[0] - reference[0]).abs().max() > 1e-3
        assert plan.outcome == REFUSED and f"max_seq_length <= {original}" in plan.reason


# -- the plan's rules, per type and window -------------------------------------------------

RULES = [
    # kind, max_seq_length, outcome, effective factor (None: as configured)
    ("default", 100, SAME, None),
    ("default", 300, EXTENDED, 300 / WINDOW),  # Unsloth's own linear rule
    ("linear", 100, SAME, None),
    ("linear", 300, SAME, None),  # 2.5 x 128 = 320 covers it
    ("linear", 400, EXTENDED, 400 / WINDOW),
    ("dynamic", 128, SAME, None),
    ("dynamic", 129, REFUSED, None),
    ("yarn", 200, SAME, None),  # 4 x 64 = 256
    ("yarn", 256, SAME, None),
    ("yarn", 300, EXTENDED, 300 / 64),
    ("llama3", 150, SAME, None),  # 4 x 48 = 192
    ("llama3", 900, SAME, None),  # kept: transformers computes llama3 the same at any length
    ("longrope", 64, SAME, None),
    ("longrope", 65, REFUSED, None),
]


@pytest.mark.parametrize(("kind", "max_seq_length", "outcome", "factor"), RULES)
def test_plan_rules(kind, max_seq_length, outcome, factor) -> None:
    config = qwen3_config(scaling_for(kind))
    plan = plan_rope(config, max_seq_length)
    assert plan.outcome == outcome, plan.reason
    if outcome == REFUSED:
        assert plan.scaling is None and kind in plan.reason and "Use max_seq_length <=" in plan.reason
        return
    if kind != "default" or outcome == EXTENDED:
        assert plan.scaling["rope_theta"] == 1e6
    if outcome == EXTENDED:
        expected_type = "linear" if kind == "default" else kind
        assert plan.scaling["rope_type"] == expected_type  # the type is kept
        assert plan.scaling["factor"] == pytest.approx(factor)
        built = rope_contract.build_config(config, plan)
        assert rope_contract.coverage(built) >= max_seq_length
    elif kind != "default":
        # Same: the tables of the widened model equal the checkpoint's.
        built = rope_contract.build_config(config, plan)
        assert rope_contract.same_tables(rope_contract.rope_tables(built), rope_contract.rope_tables(config))


@pytest.mark.parametrize("kind", [k for k in TYPES if k not in RECIPES])
def test_a_type_without_a_rule_is_kept_or_refused_never_changed(kind) -> None:
    # Types transformers added after the rules were written (e.g. proportional on v5).
    config = qwen3_config(scaling_for(kind))
    for length in (WINDOW // 2, WINDOW * 2, WINDOW * 8):
        plan = plan_rope(config, length)
        assert plan.outcome in (SAME, REFUSED)
        if plan.outcome == SAME:
            built = rope_contract.build_config(config, plan)
            assert rope_contract.same_tables(
                rope_contract.rope_tables(built), rope_contract.rope_tables(config)
            )


def test_extended_config_given_to_transformers_computes_the_grown_table() -> None:
    config = qwen3_config(scaling_for("yarn"))
    plan = plan_rope(config, 1000)
    built = rope_contract.build_config(config, plan)
    mine, theirs = shim_cos_sin(built, 1000), hf_cos_sin(built, 1000)
    torch.testing.assert_close(mine[0], theirs[0], rtol=1e-6, atol=1e-6)
    original, _ = hf_cos_sin(config, 1000)
    assert (mine[0] - original).abs().max() > 1e-3


def test_yarn_factor_derived_from_the_window_on_old_transformers(monkeypatch) -> None:
    # transformers < 4.56 ignores YaRN's factor when the original window is given:
    # factor = max_position_embeddings / original, so the config covers max_position_embeddings.
    monkeypatch.setattr(rope_contract, "_YARN_DERIVES_FACTOR", True)
    config = qwen3_config(scaling_for("yarn"))
    assert rope_contract.coverage(config) == WINDOW
    assert plan_rope(config, WINDOW + 1).scaling["factor"] == pytest.approx((WINDOW + 1) / 64)


# -- the patch: gating and the load-time wrapper --------------------------------------------


def test_non_qwen_configs_go_to_upstream_untouched() -> None:
    from unsloth_qwen_compat.patches.rope_scaling import extending_by_contract

    calls = []

    def upstream(config, factor, *rest, **keywords):
        calls.append((config, factor, rest, keywords))
        return {"type": "linear", "factor": factor}, None

    wrapped = extending_by_contract(upstream)
    llama = transformers.LlamaConfig(
        max_position_embeddings=128, rope_scaling={"rope_type": "yarn", "factor": 4.0}
    )
    bare = SimpleNamespace(rope_scaling={"rope_type": "llama3", "factor": 8.0})  # as upstream's tests pass
    assert wrapped(llama, 2.0) == ({"type": "linear", "factor": 2.0}, None)
    assert wrapped(bare, 3.0, "extra", key=1) == ({"type": "linear", "factor": 3.0}, None)
    assert calls[1][2:] == (("extra",), {"key": 1})
    # A Qwen config: the contract's plan, with the type kept.
    scaling, kind = wrapped(qwen3_config(scaling_for("linear")), 400 / WINDOW)
    assert (
        kind == "linear"
        and scaling["rope_type"] == "linear"
        and scaling["factor"] == pytest.approx(400 / WINDOW)
    )
    assert len(calls) == 2


def test_refusal_is_raised_by_the_wrapper_for_qwen() -> None:
    from unsloth_qwen_compat import UnsupportedConfigurationError
    from unsloth_qwen_compat.patches.rope_scaling import extending_by_contract

    wrapped = extending_by_contract(lambda config, factor: pytest.fail("upstream called"))
    with pytest.raises(UnsupportedConfigurationError, match=r"dynamic.*max_seq_length <= 128"):
        wrapped(qwen3_config(scaling_for("dynamic")), 2.0)


def _from_pretrained_stand_in(calls, built=None):
    # Stand-in for FastLlamaModel.from_pretrained (records what it was given).
    def from_pretrained(
        model_name="unsloth/x",
        max_seq_length=None,
        dtype=None,
        token=None,
        rope_scaling=None,
        trust_remote_code=False,
        revision=None,
        **kwargs,
    ):
        from unsloth_qwen_compat.patches import rope_scaling as patch

        calls.append({"max_seq_length": max_seq_length, "rope_scaling": rope_scaling, "kwargs": kwargs})
        config = transformers.AutoConfig.from_pretrained(model_name)
        if built is not None:
            built.append(patch._building_config.get())
        return SimpleNamespace(config=config), "tokenizer"

    return from_pretrained


@pytest.mark.parametrize("rotary_reads_config", [True, False], ids=["2026.x", "before-2026.6.3"])
def test_guard_refuses_before_loading_and_passes_the_rest_through(tmp_path, rotary_reads_config) -> None:
    from unsloth_qwen_compat.patches.rope_scaling import UnsupportedRopeScalingError, guarding_from_pretrained

    qwen3_config(scaling_for("longrope")).save_pretrained(tmp_path)
    calls: list[dict] = []
    wrapped = guarding_from_pretrained(rotary_reads_config=rotary_reads_config)(
        _from_pretrained_stand_in(calls)
    )
    # Inside max_position_embeddings, past longrope's switch: nothing else would stop it.
    with pytest.raises(UnsupportedRopeScalingError, match=r"longrope.*past 64 tokens.*max_seq_length <= 64"):
        wrapped(str(tmp_path), max_seq_length=100)
    assert calls == []
    model, _ = wrapped(str(tmp_path), max_seq_length=64, use_gradient_checkpointing=False)
    assert calls[-1]["kwargs"] == {"use_gradient_checkpointing": False}
    # A caller's explicit rope_scaling is theirs: passed through untouched.
    wrapped(str(tmp_path), max_seq_length=2048, rope_scaling={"type": "linear", "factor": 8.0})
    assert calls[-1]["rope_scaling"] == {"type": "linear", "factor": 8.0}


def test_guard_before_2026_builds_from_the_plan_and_exposes_it(tmp_path) -> None:
    from unsloth_qwen_compat import UnslothQwenCompatWarning
    from unsloth_qwen_compat.patches.rope_scaling import guarding_from_pretrained

    qwen3_config(scaling_for("linear")).save_pretrained(tmp_path)
    calls: list[dict] = []
    built: list = []
    wrapped = guarding_from_pretrained(rotary_reads_config=False)(_from_pretrained_stand_in(calls, built))
    with pytest.warns(UnslothQwenCompatWarning, match=r"linear RoPE covers.*factor 2.5 -> 3.125"):
        model, _ = wrapped(str(tmp_path), max_seq_length=400)
    assert calls[0]["rope_scaling"]["factor"] == pytest.approx(400 / WINDOW)  # upstream's swap skipped
    assert built[0].max_position_embeddings == 400
    assert rope_scaling_of(built[0])["factor"] == pytest.approx(400 / WINDOW)
    assert rope_scaling_of(model.config)["factor"] == pytest.approx(400 / WINDOW)  # exposed
    # Inside the coverage nothing changes and nothing is said.
    model, _ = wrapped(str(tmp_path), max_seq_length=300)
    assert rope_scaling_of(model.config)["factor"] == 2.5
    assert rope_scaling_of(built[-1])["factor"] == 2.5


def test_guard_leaves_other_model_types_to_upstream(tmp_path) -> None:
    from unsloth_qwen_compat.patches.rope_scaling import guarding_from_pretrained

    transformers.LlamaConfig(
        max_position_embeddings=128,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
        **{
            k: TINY[k]
            for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")
        },
    ).save_pretrained(tmp_path)
    calls: list[dict] = []
    built: list = []
    wrapped = guarding_from_pretrained(rotary_reads_config=False)(_from_pretrained_stand_in(calls, built))
    wrapped(str(tmp_path), max_seq_length=1000)  # dynamic past the window: not ours to refuse
    assert calls[0]["rope_scaling"] is None and built == [None]


def test_remembering_config_only_for_qwen() -> None:
    from unsloth_qwen_compat.patches.rope_scaling import _remembering_config

    class Rotary:  # stand-in for LlamaRotaryEmbedding(dim, max_position_embeddings, base, device, config)
        def __init__(self, dim=None, max_position_embeddings=None, base=None, device=None, config=None):
            pass

    Rotary.__init__ = _remembering_config(Rotary.__init__)
    qwen = qwen3_config(scaling_for("yarn"))
    llama = transformers.LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    assert Rotary(config=qwen)._compat_rope_config is qwen
    assert Rotary(None, None, None, None, qwen)._compat_rope_config is qwen
    assert Rotary(config=llama)._compat_rope_config is None


@pytest.mark.parametrize("layout", ["per-device lists (2025.4+)", "plain buffers (2025.3)"])
def test_cache_is_stored_where_each_unsloth_reads_it(layout) -> None:
    from unsloth_qwen_compat.patches.rope_scaling import _cache_from_config

    class StandInRotary(torch.nn.Module):  # stand-in for Unsloth's LlamaRotaryEmbedding
        def __init__(self) -> None:
            super().__init__()
            if layout.startswith("per-device"):
                self.multi_gpu_cos_cached, self.multi_gpu_sin_cached = [None], [None]

    rotary = StandInRotary()
    config = qwen3_config(scaling_for("yarn"))
    object.__setattr__(rotary, "_compat_rope_config", config)
    _cache_from_config(lambda *a: pytest.fail("upstream table built"))(
        rotary, 48, torch.device("cpu", 0), torch.float32
    )
    expected, _ = shim_cos_sin(config, 48)
    stored = rotary.multi_gpu_cos_cached[0] if layout.startswith("per-device") else rotary.cos_cached
    torch.testing.assert_close(stored, expected)
    assert rotary.current_rope_size == 48


# -- the probe ----------------------------------------------------------------------------


def test_probe_grid_finds_nothing_in_an_upstream_that_follows_the_contract() -> None:
    from unsloth_qwen_compat.patches.rope_scaling import UnsupportedRopeScalingError, upstream_rope_defects

    def fixed_upstream(config, factor):  # what a fixed _extended_rope_scaling would answer
        plan = plan_rope(config, round(factor * config.max_position_embeddings))
        if plan.outcome == REFUSED:
            raise UnsupportedRopeScalingError(plan.reason)
        return plan.scaling, plan.rope_type

    # It answers inside max_position_embeddings too (plain RoPE kept at factor < 1), so the grid
    # takes its answers there, where longrope past its original window is refused.
    assert upstream_rope_defects(fixed_upstream, None) == []

    def fixed_past_the_window_only(config, factor):  # stock's habit inside: an extension at any factor
        if factor <= 1:
            return {"type": "linear", "factor": factor, "rope_theta": rope_theta_of(config)}, "default"
        return fixed_upstream(config, factor)

    assert upstream_rope_defects(fixed_past_the_window_only, None) == [
        # Then from_pretrained never asks it inside the window, where a length-dependent type
        # is trained with one table.
        "longrope: one table past 32 tokens, not refused"
    ]


def test_probe_grid_names_each_type_linear_replacement_breaks() -> None:
    from unsloth_qwen_compat.patches.rope_scaling import upstream_rope_defects

    def linear_everywhere(config, factor):  # 2026.10.9's rule for every type but llama3
        kind = rope_contract.rope_type_of(config)
        if kind == "llama3":
            return None, kind
        return {"type": "linear", "factor": factor, "rope_theta": rope_theta_of(config)}, kind

    found = " | ".join(upstream_rope_defects(linear_everywhere, None))
    for kind in ("linear", "yarn", "dynamic", "longrope"):
        assert f"{kind}" in found
    assert "llama3" not in found and "default" not in found


@requires_unsloth
def test_installed_unsloth_probe_and_gated_wrapper() -> None:
    # The installed Unsloth's GPU code, inspected on CPU: its own _extended_rope_scaling on a
    # Llama and an attribute-less stand-in must answer exactly as before the shim.
    code = """
        import json
        from types import SimpleNamespace
        from transformers import LlamaConfig, MistralConfig
        import unsloth.models.llama as llama
        stock = llama._extended_rope_scaling
        configs = [
            LlamaConfig(max_position_embeddings=128, rope_scaling={"rope_type": "yarn", "factor": 4.0}),
            MistralConfig(max_position_embeddings=128),
            SimpleNamespace(rope_scaling={"rope_type": "llama3", "factor": 8.0}, rope_theta=5e5),
        ]
        before = [stock(c, 4.0) for c in configs]
        import unsloth_qwen_compat
        after = [llama._extended_rope_scaling(c, 4.0) for c in configs]
        entry = [p for p in unsloth_qwen_compat.status()["patches"] if p["name"] == "rope_scaling"][0]
        print(json.dumps({"before": before, "after": after, "entry": entry}, default=str))
    """
    done = run_python(code, env={"UNSLOTH_ALLOW_CPU": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["after"] == out["before"]
    if out["entry"]["verdict"] == "needed":
        assert out["entry"]["action"] == "applied", out["entry"]


# -- the conformance grid and the contract agree --------------------------------------------

#: The README's table: what a window of the grid must end in, per type (None: same or refused,
#: decided by the type's own tables, for types the table does not name).
EXPECTED = {
    "default": {"inside": SAME, "past_coverage": EXTENDED},
    "linear": {"inside": SAME, "past_max_positions": SAME, "past_coverage": EXTENDED},
    "yarn": {"inside": SAME, "past_max_positions": SAME, "past_coverage": EXTENDED},
    "llama3": {"inside": SAME, "past_max_positions": SAME, "past_coverage": SAME},
    "dynamic": {"inside": SAME, "past_coverage": REFUSED},
    "longrope": {"inside": SAME, "past_coverage": REFUSED},
}


def grid_config(spec):
    """The config of a RoPE-grid model, as the zoo builds it (without weights)."""
    from conformance import zoo

    kwargs = {
        **zoo.SHAPE,
        "max_position_embeddings": spec.max_position_embeddings,
        **zoo.rope_config_kwargs(spec),
    }
    if spec.family != "qwen2":
        kwargs["head_dim"] = zoo.HEAD_DIM
    return transformers.AutoConfig.for_model(spec.family, **kwargs)


def test_conformance_grid_windows_follow_the_contract() -> None:
    from conformance import rope_grid

    seen = set()
    for cell in rope_grid.cells(rope_grid.FAMILIES):
        spec = cell.spec
        config = grid_config(spec)
        assert rope_contract.coverage(config) == rope_grid.coverage(spec), cell
        plan = plan_rope(config, cell.max_seq_length)
        expected = EXPECTED.get(cell.rope_type, {}).get(cell.window)
        assert plan.outcome == (expected or plan.outcome), (str(cell), plan.reason)
        if expected is None:
            assert plan.outcome in (SAME, REFUSED)
        seen.add(cell.rope_type)
    assert seen == set(TYPES)  # every type the installed transformers implements is in the grid


def test_readme_rope_table_is_generated_from_the_committed_reports() -> None:
    from conformance import rope_table

    from .conftest import REPO

    lines = rope_table.table(rope_table.read(REPO / "conformance-reports"))
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index(rope_table.START) :]
    block = block[block.index("\n") + 1 : block.index(rope_table.END)]
    assert block == "\n".join(lines) + "\n", "run: python -m conformance.rope_table --readme README.md"
    # Every leg's shim run has the grid, and the shim got no cell wrong on any of them.
    assert all("WRONG" not in line for line in lines[2:])


def test_the_plan_extends_by_the_rule_the_conformance_grid_checks() -> None:
    # The suite's own statement of the README's extension rule, against the shim's plans, and
    # against deliberately wrong extensions (the mutations the grid must catch).
    from conformance import rope_grid

    extended = 0
    for cell in rope_grid.cells(rope_grid.FAMILIES):
        spec = cell.spec
        plan = plan_rope(grid_config(spec), cell.max_seq_length)
        if plan.outcome != EXTENDED:
            continue
        extended += 1
        exposed = {"scaling": plan.scaling, "theta": plan.scaling["rope_theta"]}
        assert rope_grid.extension_rule_errors(spec, cell.max_seq_length, exposed) == [], str(cell)
        wrong_base = {**exposed, "theta": exposed["theta"] * 1.01}
        wrong_factor = {**exposed, "scaling": {**plan.scaling, "factor": plan.scaling["factor"] * 1.25}}
        assert rope_grid.extension_rule_errors(spec, cell.max_seq_length, wrong_base)
        assert rope_grid.extension_rule_errors(spec, cell.max_seq_length, wrong_factor)
    assert extended >= 6  # plain, linear and yarn past their coverage on the Qwen families
