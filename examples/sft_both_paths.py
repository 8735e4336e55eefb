"""SFT with TRL's SFTTrainer on either path from one config: ``--use-unsloth`` is the only difference.

    python examples/sft_both_paths.py                 # HF path (runs on CPU too)
    python examples/sft_both_paths.py --use-unsloth   # Unsloth path (needs a CUDA GPU)

A tiny random Qwen3 checkpoint and tokenizer are built locally first, so nothing is
downloaded; point ``CONFIG["model"]["name"]`` at a real Qwen checkpoint for a real run.
"""

from __future__ import annotations

# First: imports Unsloth (when installed) before transformers, and patches it for Qwen.
import unsloth_qwen_compat  # noqa: F401  isort: skip

import argparse
import copy
import tempfile
from pathlib import Path

import torch

from unsloth_qwen_compat.loading import (
    attach_lora,
    count_trainable_parameters,
    framework_of,
    load_base_model,
    resolve_dtype,
)

#: The training YAML's shape. Everything both paths need is here, once.
CONFIG = {
    "model": {
        "name": None,  # filled in with the tiny local checkpoint below
        "use_unsloth": False,
        "load_in_4bit": torch.cuda.is_available(),  # QLoRA on a GPU; bitsandbytes 4-bit needs CUDA
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "dtype": "auto",
        "gradient_checkpointing": True,
    },
    "data": {"max_length": 128},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "bias": "none"},
    "training": {"max_steps": 4, "learning_rate": 2e-4, "per_device_train_batch_size": 2},
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--use-unsloth", action="store_true", help="train on the Unsloth path")
    parser.add_argument("--steps", type=int, default=CONFIG["training"]["max_steps"])
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoint and outputs go")
    args = parser.parse_args()

    from datasets import Dataset
    from tiny_qwen import build_tiny_qwen, conversations
    from trl import SFTConfig, SFTTrainer

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sft-both-paths-"))
    config = copy.deepcopy(CONFIG)
    config["model"]["name"] = str(build_tiny_qwen(workdir / "tiny-qwen3"))
    config["model"]["use_unsloth"] = args.use_unsloth  # the one flag

    model, tokenizer = load_base_model(config)
    model = attach_lora(model, config)
    print(f"path: {framework_of(model)}; trainable parameters: {count_trainable_parameters(model)}")

    dtype = resolve_dtype(config["model"]["dtype"])
    training = config["training"]
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(conversations(32)),
        args=SFTConfig(
            output_dir=str(workdir / "out"),
            max_steps=args.steps,
            learning_rate=training["learning_rate"],
            per_device_train_batch_size=training["per_device_train_batch_size"],
            max_length=config["data"]["max_length"],
            # The loader already set checkpointing the way each path wants it; the
            # Trainer's own switch would redo it the HF way on both.
            gradient_checkpointing=False,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=0,
        ),
    )
    result = trainer.train()
    losses = [round(entry["loss"], 4) for entry in trainer.state.log_history if "loss" in entry]
    print(f"losses: {losses}")
    print(f"train_loss: {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
