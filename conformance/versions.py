"""Versions and hardware, read without importing Unsloth (the oracle uses this too).

Package versions come from installed metadata, so reading them never imports (and never
triggers the patching of) the packages themselves.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from importlib import metadata

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "unsloth", "unsloth_zoo", "trl", "tokenizers")


def package_version(name: str) -> str | None:
    for candidate in (name, name.replace("_", "-")):
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            continue
    return None


def gpu_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


@lru_cache(maxsize=1)
def collect() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        **{name: package_version(name) for name in PACKAGES},
        "cuda": torch.version.cuda,
        "gpu": gpu_name(),
        # TF32 silently turns fp32 matmuls into ~1e-3-accurate ones; the fp32 bounds assume it off.
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        # Triton kernels' default for fp32 dot products (the suite sets "ieee"; unset means TF32).
        "triton_f32_default": os.environ.get("TRITON_F32_DEFAULT", ""),
    }


def one_line(env: dict | None = None) -> str:
    env = env or collect()
    keys = ("torch", "transformers", "unsloth", "unsloth_zoo", "peft", "bitsandbytes", "gpu")
    return ", ".join(f"{k}={env.get(k)}" for k in keys)
