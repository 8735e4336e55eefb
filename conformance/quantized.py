"""Which weights a 4-bit model actually stores in 4 bits (shared by oracle and candidate).

bitsandbytes ``Linear4bit`` modules are the usual answer, but MoE experts fused into 3-D
parameters (transformers 5) are not Linear modules: a loader may or may not quantize
them, so packed parameters and buffers outside ``Linear4bit`` are listed too.
"""

from __future__ import annotations

import torch


def quantized_names(model) -> list[str]:
    names = []
    for module_name, module in model.named_modules():
        if type(module).__name__ == "Linear4bit":
            names.append(module_name)
            continue
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for tensor_name, tensor in tensors:
            packed = type(tensor).__name__ == "Params4bit" or hasattr(tensor, "quant_state")
            if packed or (tensor.dtype == torch.uint8 and tensor.numel() > 1):
                names.append(f"{module_name}.{tensor_name}")
    return sorted(names)


def layer_path(name: str) -> str:
    """A parameter name from ``layers.`` on: what a wrapped and an unwrapped model share (the
    oracle's side of candidate.layer_key, which also drops PEFT's adapter name)."""
    return name[name.index("layers.") :] if "layers." in name else name
