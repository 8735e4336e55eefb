"""Five DDP training steps on several GPUs, on either path, from the loader's config.

    python examples/ddp_train.py --make-checkpoint DIR
    torchrun --nproc_per_node 2 examples/ddp_train.py --checkpoint DIR --framework hf --out OUT
    torchrun --nproc_per_node 2 examples/ddp_train.py --checkpoint DIR --framework unsloth --out OUT

Each rank loads the 4-bit checkpoint on its own GPU (the loader's device_map follows
LOCAL_RANK), attaches LoRA and trains 5 steps of a ``Trainer`` subclass that generates
inside ``compute_loss`` (through the unwrapped model, as DDP's wrapper cannot generate).
Rank 0 writes OUT/ddp-<framework>.json: world size, each rank's device, the losses, and
whether the LoRA weights are identical on every rank after training (DDP's all-reduce).
The HF run hides Unsloth from the process, so it is stock transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))
sys.path.insert(0, str(EXAMPLES.parent))

from gpu_parity import CONFIG, PROMPTS, SHAPE, _hide_unsloth  # noqa: E402

STEPS, BATCH, SEQUENCE = 5, 2, 256


def train(checkpoint: Path, framework: str, out: Path, load_in_4bit: bool) -> None:
    if framework == "hf":
        _hide_unsloth()
    import unsloth_qwen_compat  # noqa: F401  isort: skip  (first: patches Unsloth before transformers)

    import torch
    import torch.distributed as dist
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from unsloth_qwen_compat.loading import attach_lora, generate_replies, load_base_model

    config = json.loads(json.dumps(CONFIG))
    config["model"].update(name=str(checkpoint), use_unsloth=framework == "unsloth")
    config["model"]["load_in_4bit"] = load_in_4bit
    config["data"]["max_length"] = SEQUENCE
    model, tokenizer = load_base_model(config)
    model = attach_lora(model, config)

    generator = torch.Generator().manual_seed(0)
    regular = min(tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens)
    ids = torch.randint(0, regular, (STEPS * BATCH * 8, SEQUENCE), generator=generator).tolist()
    rows = [{"input_ids": r, "attention_mask": [1] * SEQUENCE, "labels": r} for r in ids]
    generated: list[int] = []

    class GenerateInLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            replies = generate_replies(
                self.accelerator.unwrap_model(model), self.processing_class, PROMPTS[:1], max_new_tokens=8
            )
            generated.append(sum(len(group) for group in replies.texts))
            outputs = model(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    trainer = GenerateInLossTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows),
        args=TrainingArguments(
            output_dir=str(out / f"trainer-{framework}"),
            max_steps=STEPS,
            per_device_train_batch_size=BATCH,
            learning_rate=1e-3,
            bf16=torch.cuda.is_available(),
            use_cpu=not torch.cuda.is_available(),  # CPU (gloo) smoke runs of the script
            gradient_checkpointing=False,  # the loader set it the way each path wants
            remove_unused_columns=False,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=0,
            ddp_find_unused_parameters=False,
        ),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    # After DDP training every rank must hold the same LoRA weights.
    lora = torch.cat([p.detach().float().flatten() for n, p in model.named_parameters() if "lora_" in n])
    gathered = [torch.empty_like(lora) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, lora)
    devices = [None] * dist.get_world_size()
    dist.all_gather_object(devices, str(next(model.parameters()).device))
    if dist.get_rank() == 0:
        result = {
            "framework": framework,
            "world_size": dist.get_world_size(),
            "devices": devices,
            "losses": losses,
            "generated_per_step": generated,
            "lora_identical_across_ranks": all(torch.equal(gathered[0], g) for g in gathered[1:]),
            "lora_changed": bool(lora.abs().sum() > 0),
        }
        (out / f"ddp-{framework}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--make-checkpoint", type=Path, help="build the tiny checkpoint here and exit")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--framework", choices=("hf", "unsloth"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    if args.make_checkpoint:
        from tiny_qwen import build_tiny_qwen

        print(build_tiny_qwen(args.make_checkpoint, **SHAPE))
        return 0
    if not (args.checkpoint and args.framework and args.out):
        parser.error("--checkpoint, --framework and --out are required (or --make-checkpoint)")
    if "LOCAL_RANK" not in os.environ:
        parser.error("launch with torchrun --nproc_per_node N (or accelerate launch)")
    args.out.mkdir(parents=True, exist_ok=True)
    train(args.checkpoint, args.framework, args.out, args.load_in_4bit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
