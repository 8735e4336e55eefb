"""Shared helpers. Anything that imports Unsloth runs in a child process: Unsloth
patches transformers globally on import, which would leak between tests."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import tempfile
import textwrap
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

requires_unsloth = pytest.mark.skipif(find_spec("unsloth") is None, reason="Unsloth is not installed")

# A stand-in for "Unsloth is not installed": a child's first lines, hiding unsloth and
# unsloth_zoo from both the import system and package metadata. Read by path: importing
# the package here would import Unsloth into every test process.
HIDE_UNSLOTH = runpy.run_path(str(REPO / "unsloth_qwen_compat" / "_hide_unsloth.py"))["CODE"]


def run_python(
    code: str, *, env: dict[str, str] | None = None, args: list[str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("UNSLOTH")}
    child_env["PYTHONPATH"] = os.pathsep.join([str(REPO), child_env.get("PYTHONPATH", "")])
    child_env.update(env or {})
    command = [sys.executable, *(args or ["-c", textwrap.dedent(code)])]
    # Unsloth writes unsloth_compiled_cache/ into the working directory: keep it out of the tree.
    with tempfile.TemporaryDirectory() as workdir:
        return subprocess.run(
            command, env=child_env, capture_output=True, text=True, timeout=timeout, cwd=workdir
        )


def child_status(prelude: str = "", env: dict[str, str] | None = None) -> dict[str, Any]:
    """``unsloth_qwen_compat.status()`` as seen by a fresh child process."""
    done = run_python(
        prelude + "\nimport json, warnings\nwarnings.simplefilter('always')\n"
        "import unsloth_qwen_compat as m\nprint(json.dumps(m.status()))",
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"_stderr": done.stderr}


#: Every patch slot, in the order the shim probes them: written out here (not read from the
#: package) so that adding or dropping a patch is a visible test change.
PATCH_SLOTS = (
    "qwen3_registration",
    "rope_scaling",
    "sdpa_causal_fallback",
    "lora_target_maps",
    "chat_templates",
    "kv_cache_left_padding",
    "qwen2_fused_qkv_bias",
    "hybrid_qwen_models",
)


#: A Qwen config small enough to build in milliseconds on CPU.
TINY_QWEN = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=64,
)


#: The hybrid Qwen types' extra fields: one linear-attention and one full-attention layer,
#: and (MoE types) a shared expert beside four routed ones.
TINY_HYBRID = dict(
    num_hidden_layers=2,
    head_dim=16,
    layer_types=["linear_attention", "full_attention"],
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=2,
)
TINY_HYBRID_MOE = dict(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16
)
HYBRID_TYPES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next")


def tiny_qwen_config(model_type: str) -> Any:
    import transformers

    extra: dict[str, Any] = {}
    if model_type in HYBRID_TYPES:
        extra = dict(TINY_HYBRID, **(TINY_HYBRID_MOE if "moe" in model_type or "next" in model_type else {}))
    config = transformers.AutoConfig.for_model(model_type, **{**TINY_QWEN, **extra})
    if model_type == "qwen3_moe":
        config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size = 4, 2, 16
    return config
