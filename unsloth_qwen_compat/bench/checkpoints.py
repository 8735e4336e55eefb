"""The random-weight checkpoints the cases load: where they live, and how one is built.

A checkpoint is built once per shape, in a worker process without Unsloth (stock
transformers), and reused by every later run: :func:`checkpoint_dir` keys it by the
shape, the transformers major version and :data:`CHECKPOINT_FORMAT`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .workload import SHAPES, Shape, build_config, transformers_major

#: Where the benchmark writes its random-weight checkpoints, one directory per shape.
DEFAULT_CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unsloth_qwen_compat" / "bench"
)

# Bump when the way checkpoints are built changes, so old ones are not reused.
# 2: the tokenizer is built here (byte-level, no merges) instead of the conformance zoo's.
CHECKPOINT_FORMAT = 2

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
#: Chat template family per model type (the package's copies of Qwen's published ones).
TEMPLATE_FAMILY = {"qwen2": "Qwen2.5", "qwen3": "Qwen3"}


def checkpoint_dir(shape: Shape, cache_dir: Path) -> Path:
    """Where ``shape``'s checkpoint lives: keyed by the shape and the transformers major version."""
    material = {"format": CHECKPOINT_FORMAT, "shape": asdict(shape), "transformers": transformers_major()}
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir / f"{shape.name}-{key}"


def checkpoint_ready(directory: Path) -> bool:
    return (directory / "COMPLETE").is_file()


def build_tokenizer(model_type: str) -> Any:
    """A Qwen-style tokenizer small enough to build in milliseconds.

    The cases train on random token ids, so the tokenizer only has to be one that the
    loaders accept: byte-level BPE (as Qwen's) over the 256 byte symbols with no merges,
    ChatML's special tokens and Qwen's published chat template.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from ..patches.chat_templates import published_template

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE(vocab={symbol: i for i, symbol in enumerate(alphabet)}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (ENDOFTEXT, IM_START, IM_END)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=32768,
        padding_side="right",
    )
    tokenizer.chat_template = published_template(TEMPLATE_FAMILY[model_type])
    return tokenizer


def build_checkpoint(shape_name: str, target: Path, device: str, seed: int) -> dict[str, Any]:
    """Write ``shape_name``'s random-weight bf16 checkpoint and a tokenizer to ``target``.

    Imports torch and transformers: run it in a process without Unsloth (the worker's
    ``prepare`` mode). Written to a staging directory first, so a directory with
    ``COMPLETE`` in it is always whole.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ..loading import _dtype_keyword

    shape = SHAPES[shape_name]
    tokenizer = build_tokenizer(shape.model_type)
    config = build_config(shape)
    config.bos_token_id = config.pad_token_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config.eos_token_id = tokenizer.convert_tokens_to_ids(IM_END)
    device = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    torch.manual_seed(seed)
    # Built directly in bf16 on the GPU: an 8B model initialises in seconds there.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **{_dtype_keyword(): torch.bfloat16})
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2:  # matrices N(0, 0.02); norms stay 1, biases 0
                parameter.normal_(0.0, 0.02)
    staging = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "bench_shape.json").write_text(json.dumps(asdict(shape), indent=1))
    (staging / "COMPLETE").write_text("ok\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    parameters = sum(p.numel() for p in model.parameters())
    return {"parameters": parameters, "build_device": device, "build_seconds": time.perf_counter() - started}
