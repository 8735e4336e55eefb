"""Check on a CUDA GPU that the HF path and the Unsloth path train the same thing from one config.

    python examples/gpu_parity.py --out DIR

Builds a tiny random Qwen3 checkpoint in DIR, then runs each path in its own process
(Unsloth patches transformers globally on import, so the HF process hides Unsloth from
the import system and never loads it). Each process loads the checkpoint in 4-bit NF4,
attaches the same LoRA, and runs 5 steps of a ``Trainer`` subclass whose
``compute_loss`` generates replies (from the third step on) and computes GRPO-style
reference logits with the adapter disabled. Written to DIR: ``hf.json``,
``unsloth.json``, each process's log, and ``parity.json`` with the checks:

- both paths have the same trainable parameter count and 4-bit settings, and loaded
  the checkpoint named (not a pre-quantized copy);
- their first-step losses agree (rtol 2%);
- within each path, the peak memory of a training step after a generation equals the
  one before it (5%): generation left training mode and checkpointing on;
- training mode, checkpointing flags and ``use_cache`` are as before every generation;
- a control: a step taken in eval mode needs more memory than one in training mode, so
  the measurement would see the trap it guards against;
- the HF process never imported Unsloth.

Prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
REPO = EXAMPLES.parent

STEPS = 5
GENERATE_FROM_STEP = 2  # steps 0 and 1 warm up and measure "before"; 2.. generate first
BATCH, SEQUENCE = 4, 512
LOSS_RTOL = 0.02
PEAK_RTOL = 0.05
PROMPTS = ["What is the capital of France?", "How many legs does a spider have?"]

CONFIG = {
    "model": {
        "name": None,  # the tiny checkpoint
        "use_unsloth": False,
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
        "dtype": "bfloat16",
        "gradient_checkpointing": True,
    },
    "data": {"max_length": SEQUENCE},
    "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "bias": "none"},
}

#: Big enough that checkpointing visibly changes a step's peak memory, small enough for seconds.
SHAPE = {
    "layers": 8,
    "hidden_size": 512,
    "heads": 8,
    "kv_heads": 4,
    "head_dim": 64,
    "intermediate_size": 1536,
}


def _hide_unsloth() -> None:
    """Make ``unsloth`` / ``unsloth_zoo`` unimportable and uninstalled-looking in this process.

    The package's helper, run by path: importing it through the package would import Unsloth.
    """
    runpy.run_path(str(REPO / "unsloth_qwen_compat" / "_hide_unsloth.py"))["hide_unsloth"]()


# --------------------------------------------------------------------------------------
# One path, in its own process


def run_path(path: str, checkpoint: Path, out: Path) -> None:
    if path == "hf":
        _hide_unsloth()
    # First: on the Unsloth path this imports and patches Unsloth before transformers loads.
    import unsloth_qwen_compat  # noqa: F401  isort: skip

    import torch
    from transformers import Trainer, TrainingArguments

    from unsloth_qwen_compat._hide_unsloth import imported_hidden
    from unsloth_qwen_compat.loading import (
        attach_lora,
        count_trainable_parameters,
        framework_of,
        generate_replies,
        load_base_model,
        reference_logits,
    )

    config = json.loads(json.dumps(CONFIG))
    config["model"]["name"] = str(checkpoint)
    config["model"]["use_unsloth"] = path == "unsloth"
    model, tokenizer = load_base_model(config)
    model = attach_lora(model, config)
    assert framework_of(model) == path, framework_of(model)

    def flags() -> dict:
        checkpointing = [
            m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")
        ]
        return {
            "training": model.training,
            "all_modules_training": all(m.training for m in model.modules()),
            "checkpointing_flags": sorted({str(v) for v in checkpointing}),
            "use_cache": model.config.use_cache,
        }

    generator = torch.Generator().manual_seed(0)
    regular = min(tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens)
    rows = [
        {"input_ids": ids, "attention_mask": [1] * SEQUENCE, "labels": ids}
        for ids in torch.randint(0, regular, (STEPS * BATCH, SEQUENCE), generator=generator).tolist()
    ]

    records: list[dict] = []

    class GenerateInLossTrainer(Trainer):
        """compute_loss generates first (as GRPO does), then takes the training step."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            step = self.state.global_step
            record: dict = {"step": step}
            if step >= GENERATE_FROM_STEP:
                before = flags()
                replies = generate_replies(
                    model,
                    self.processing_class,
                    PROMPTS,
                    num_return_sequences=2,
                    max_new_tokens=16,
                    do_sample=True,
                )
                reference = reference_logits(
                    model, input_ids=inputs["input_ids"][:1], attention_mask=inputs["attention_mask"][:1]
                )
                record.update(
                    generated=sum(len(group) for group in replies.texts),
                    reference_logits_finite=bool(torch.isfinite(reference).all()),
                    flags_before_generation=before,
                    flags_after_generation=flags(),
                )
                del replies, reference
            torch.cuda.synchronize()
            record["allocated_before_step"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            records.append(record)
            outputs = model(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        def training_step(self, model, inputs, num_items_in_batch=None):  # noqa: ANN001
            loss = super().training_step(model, inputs, num_items_in_batch)
            torch.cuda.synchronize()
            record = records[-1]
            record["step_peak_bytes"] = torch.cuda.max_memory_allocated() - record["allocated_before_step"]
            record["loss"] = float(loss)
            return loss

    from datasets import Dataset

    trainer = GenerateInLossTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(rows),
        args=TrainingArguments(
            output_dir=str(out / f"trainer-{path}"),
            max_steps=STEPS,
            per_device_train_batch_size=BATCH,
            learning_rate=1e-4,
            bf16=config["model"]["dtype"] == "bfloat16",
            gradient_checkpointing=False,  # the loader set it the way each path wants
            remove_unused_columns=False,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=0,
            data_seed=0,
        ),
    )
    trainer.train()

    # Control: the same step in training mode and in eval mode (the trap's memory).
    batch = {
        k: torch.tensor(v[:BATCH], device=model.device) for k, v in Dataset.from_list(rows)[:BATCH].items()
    }

    def manual_step_peak() -> int:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model(**batch).loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        model.zero_grad(set_to_none=True)
        return peak

    model.train()
    train_mode_peak = manual_step_peak()
    model.eval()
    eval_mode_peak = manual_step_peak()
    model.train()

    quant = getattr(model.config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else dict(quant or {})
    result = {
        "path": path,
        "device": torch.cuda.get_device_name(),
        "versions": unsloth_qwen_compat.status()["environment"]["versions"],
        "loaded_checkpoint": getattr(model.config, "_name_or_path", None),
        "quantization": {
            key: str(quant.get(key))
            for key in (
                "load_in_4bit",
                "bnb_4bit_quant_type",
                "bnb_4bit_use_double_quant",
                "bnb_4bit_compute_dtype",
            )
        },
        "trainable_parameters": count_trainable_parameters(model),
        "steps": records,
        "control": {
            "train_mode_step_peak_bytes": train_mode_peak,
            "eval_mode_step_peak_bytes": eval_mode_peak,
        },
        "unsloth_imported": bool(imported_hidden()),
    }
    (out / f"{path}.json").write_text(json.dumps(result, indent=2))


# --------------------------------------------------------------------------------------
# The parent: build, run both, compare


def _checks(results: dict[str, dict], checkpoint: Path) -> list[tuple[str, bool, str]]:
    hf, un = results["hf"], results["unsloth"]
    checks = []
    counts = (hf["trainable_parameters"], un["trainable_parameters"])
    checks.append(
        ("same trainable parameter count", counts[0] == counts[1], f"hf {counts[0]}, unsloth {counts[1]}")
    )
    checks.append(
        (
            "same 4-bit settings",
            hf["quantization"] == un["quantization"],
            f"hf {hf['quantization']}; unsloth {un['quantization']}",
        )
    )
    for result in (hf, un):
        loaded = result["loaded_checkpoint"]
        same = loaded is not None and Path(loaded).resolve() == checkpoint.resolve()
        checks.append((f"{result['path']}: loaded the checkpoint named", same, str(loaded)))
    first = (hf["steps"][0]["loss"], un["steps"][0]["loss"])
    relative = abs(first[0] - first[1]) / abs(first[0])
    checks.append(
        (
            "first-step losses agree",
            relative <= LOSS_RTOL,
            f"hf {first[0]:.5f}, unsloth {first[1]:.5f}, relative difference {relative:.2e} (rtol {LOSS_RTOL})",
        )
    )
    for result in (hf, un):
        path, steps = result["path"], result["steps"]
        before = steps[GENERATE_FROM_STEP - 1]["step_peak_bytes"]
        after = [s["step_peak_bytes"] for s in steps[GENERATE_FROM_STEP:]]
        worst = max(after, key=lambda peak: abs(peak - before))
        checks.append(
            (
                f"{path}: step peak memory after generation == before",
                abs(worst - before) <= PEAK_RTOL * before,
                f"before {before / 2**20:.1f} MiB, after {[round(a / 2**20, 1) for a in after]} MiB",
            )
        )
        restored = all(
            s["flags_after_generation"] == s["flags_before_generation"] for s in steps[GENERATE_FROM_STEP:]
        )
        sample = steps[-1]["flags_after_generation"]
        checks.append(
            (f"{path}: training flags restored after every generation", restored, json.dumps(sample))
        )
        generated = all(
            s["generated"] == 2 * len(PROMPTS) and s["reference_logits_finite"]
            for s in steps[GENERATE_FROM_STEP:]
        )
        checks.append((f"{path}: generated replies and reference logits", generated, ""))
        control = result["control"]
        ratio = control["eval_mode_step_peak_bytes"] / max(control["train_mode_step_peak_bytes"], 1)
        checks.append(
            (
                f"{path}: control: an eval-mode step needs more memory (checkpointing is on in training)",
                ratio > 1.2,
                f"eval/train step peak = {ratio:.2f}",
            )
        )
    checks.append(("hf process never imported Unsloth", not hf["unsloth_imported"], ""))
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the checkpoint, logs and JSON")
    parser.add_argument("--child", choices=("hf", "unsloth"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = args.out.resolve()
    if args.child:
        run_path(args.child, args.checkpoint, out)
        return 0

    import torch

    if not torch.cuda.is_available():
        print("gpu_parity.py needs a CUDA GPU (4-bit bitsandbytes and Unsloth both do)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(EXAMPLES))
    from tiny_qwen import build_tiny_qwen

    out.mkdir(parents=True, exist_ok=True)
    checkpoint = build_tiny_qwen(out / "checkpoint", **SHAPE)
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), str(EXAMPLES), environment.get("PYTHONPATH")) if p
    )
    results, failed = {}, []
    for path in ("hf", "unsloth"):
        workdir = out / f"work-{path}"  # Unsloth writes unsloth_compiled_cache/ into the working directory
        workdir.mkdir(exist_ok=True)
        log = out / f"{path}.log"
        with log.open("w") as handle:
            done = subprocess.run(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--child",
                    path,
                    "--checkpoint",
                    str(checkpoint),
                    "--out",
                    str(out),
                ],
                cwd=workdir,
                env=environment,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        print(f"{path}: exit {done.returncode}, log {log}")
        if done.returncode != 0:
            failed.append(path)
            print("".join(log.read_text().splitlines(keepends=True)[-30:]))
        else:
            results[path] = json.loads((out / f"{path}.json").read_text())
    if failed:
        (out / "parity.json").write_text(json.dumps({"failed_paths": failed}, indent=2))
        return 1
    checks = _checks(results, checkpoint)
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}" + (f": {detail}" if detail else ""))
    for path in ("hf", "unsloth"):
        print(f"{path} losses: {[round(s['loss'], 5) for s in results[path]['steps']]}")
    summary = {
        "device": results["hf"]["device"],
        "passed": all(ok for _, ok, _ in checks),
        "checks": [{"name": name, "passed": ok, "detail": detail} for name, ok, detail in checks],
        "first_step_loss": {path: results[path]["steps"][0]["loss"] for path in results},
        "step_peak_bytes": {path: [s["step_peak_bytes"] for s in results[path]["steps"]] for path in results},
    }
    (out / "parity.json").write_text(json.dumps(summary, indent=2))
    print(f"results: {out / 'parity.json'}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
