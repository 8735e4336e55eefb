"""The Hugging Face reference, run as its own process: ``python -m conformance.oracle JOBS.json``,
or ``python -m conformance.oracle --serve FD``: one process for a whole pytest process, running
each JOBS.json path it reads on stdin and answering with its exit code, one line on FD (the
import of torch and transformers, 10-20 s per process on a busy GPU machine, paid once instead of
once per batch; the RoPE grid asks for a batch per family, RoPE type and entry point).

Unsloth patches transformers classes globally when imported, and rewrites some installed
files, so a reference computed in a process that imported it is not a reference. This
process never imports ``unsloth``, ``unsloth_zoo`` or ``unsloth_qwen_compat``: it checks
that at start and again at the end, and the client (oracle_client.py) also sets
``UNSLOTH_QWEN_COMPAT_DISABLE=1`` in its environment.

JOBS.json is a list of ``{"request": {...}, "out": "RESULT.pt", "adapter_out": "DIR"}``
(requests come from plan.py). Each result is a dict of tensors / numbers / strings saved
with ``torch.save``. Models use eager attention; TF32 is off, so fp32 means fp32.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import traceback

FORBIDDEN_MODULES = ("unsloth", "unsloth_zoo", "unsloth_qwen_compat")


def _assert_clean(when: str) -> None:
    loaded = [name for name in FORBIDDEN_MODULES if name in sys.modules]
    if loaded:
        raise RuntimeError(f"oracle process {when}: {loaded} imported; the HF reference would be patched")


_assert_clean("at start")
os.environ["CONFORMANCE_ORACLE"] = "1"

import torch  # noqa: E402

from conformance import chat_reference, inputs, peft_reference, zoo, zoo_tokenizer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    return {"dtype": dtype} if zoo.transformers_major() >= 5 else {"torch_dtype": dtype}


def _load_model(request: dict, with_adapter: bool = True):
    from transformers import AutoModelForCausalLM

    path = zoo.model_dir(zoo.by_name(request["model"]))
    dtype = DTYPES[request["dtype"]]
    kwargs = dict(_dtype_kwarg(dtype), attn_implementation="eager")
    if request.get("rope"):  # the RoPE a candidate says it computes, on the same weights
        kwargs["config"] = _rope_config(path, request["rope"])
    quant = request.get("quantization")
    if quant:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant["quant_type"],
            bnb_4bit_use_double_quant=quant["double_quant"],
            bnb_4bit_compute_dtype=DTYPES[quant["compute_dtype"]],
            llm_int8_skip_modules=quant["skip_modules"],
        )
        model = AutoModelForCausalLM.from_pretrained(path, device_map={"": 0}, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(request["device"])
    if with_adapter and request.get("adapter_dir"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, request["adapter_dir"])
    model.eval()
    return model


def needs_truth(request: dict) -> bool:
    """Reduced precision (or 4-bit) references carry an fp32 truth: bounds come from rounding."""
    return request["dtype"] != "fp32" or bool(request.get("quantization"))


def _truth_model(request: dict, peer=None):
    """HF in fp32 on the weights ``request``'s model computes with: every parameter rounded to
    the request's dtype and, for a 4-bit request, the quantized weights dequantized from
    ``peer`` (the loaded 4-bit model). The truth then differs from the peer (HF in the
    request's precision) by compute rounding alone, which is what the bound is made of."""
    model = _load_model({**request, "dtype": "fp32", "quantization": None}, with_adapter=False)
    dtype = DTYPES["bf16" if request.get("quantization") else request["dtype"]]
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(dtype).float())
        if request.get("quantization"):
            _copy_dequantized(peer, model)
            _round_trip_packed(model, request["quantization"])
    if request.get("adapter_dir"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, request["adapter_dir"])
    model.eval()
    return model


def _copy_dequantized(quantized, model) -> None:
    import bitsandbytes as bnb

    modules = dict(model.named_modules())
    copied = 0
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            # Under a PEFT LoRA layer the 4-bit module is its .base_layer.
            modules[name.removesuffix(".base_layer")].weight.copy_(weight.float())
            copied += 1
    if copied == 0:
        raise RuntimeError("4-bit reference: no Linear4bit module to dequantize")


def _round_trip_packed(model, quant: dict) -> None:
    """NF4-round, in place, the tensors the candidate packs beside the Linear layers
    (``quant["packed_tensors"]``: fused MoE expert stacks, 3-D parameters bitsandbytes' HF path
    keeps in bf16) as bitsandbytes packs a Params4bit: the bf16 value in memory order, blocks
    of 64, the request's double quantization. Every named tensor must be found."""
    wanted = set(quant.get("packed_tensors") or ())
    if not wanted:
        return
    import bitsandbytes as bnb

    from conformance.quantized import layer_path

    found = set()
    for name, param in model.named_parameters():
        if layer_path(name) not in wanted:
            continue
        value = param.detach().to(torch.bfloat16).contiguous()
        data, state = bnb.functional.quantize_4bit(
            value, blocksize=64, quant_type=quant["quant_type"], compress_statistics=quant["double_quant"]
        )
        param.copy_(bnb.functional.dequantize_4bit(data, state).reshape(param.shape).float())
        found.add(layer_path(name))
    if found != wanted:
        raise RuntimeError(f"4-bit reference: packed tensors not in the model: {sorted(wanted - found)[:4]}")


def _rope_config(path, rope: dict):
    from transformers import AutoConfig

    from conformance import rope_grid

    return rope_grid.apply_rope(
        AutoConfig.from_pretrained(path), rope["scaling"], rope["theta"], rope["max_position_embeddings"]
    )


def run_rope_facts(request: dict, job: dict) -> dict:
    """What transformers says about a grid cell: does the checkpoint's RoPE change with the
    sequence length within ``seq_len``, and does the candidate's exposed RoPE equal it."""
    from transformers import AutoConfig

    from conformance import rope_grid

    path = zoo.model_dir(zoo.by_name(request["model"]))
    checkpoint = AutoConfig.from_pretrained(path)
    facts = {"length_dependent": rope_grid.length_dependent(checkpoint, request["seq_len"])}
    if request.get("rope"):
        facts["exposed_same"] = rope_grid.same_rope(checkpoint, _rope_config(path, request["rope"]))
    return facts


def _tokenizer(request: dict):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(zoo.model_dir(zoo.by_name(request["model"])))


def quantized_module_names(model) -> list[str]:
    from conformance.quantized import quantized_names

    return quantized_names(model)


def run_forward(request: dict, job: dict) -> dict:
    model = _load_model(request)
    high = zoo_tokenizer.regular_token_count(_tokenizer(request))
    ids = inputs.random_ids(request["seed"], 1, request["seq_len"], high)
    with torch.no_grad():
        logits = model(input_ids=ids.to(request["device"]), use_cache=False).logits
    result = {"input_ids": ids, "logits": logits[0].float().cpu()}
    if request.get("quantization"):
        result["quantized_modules"] = quantized_module_names(model)
    if needs_truth(request):
        truth = _truth_model(request, peer=model)
        with torch.no_grad():
            result["truth"] = {
                "logits": truth(input_ids=ids.to(request["device"]), use_cache=False).logits[0].float().cpu()
            }
            if (request.get("quantization") or {}).get("packed_tensors"):
                # The peer must compute with the same 4-bit weights: HF's NF4 model keeps the
                # packed tensors in bf16, so the peer is the truth's weights run in bf16, as
                # Linear4bit runs (dequantized to bf16, bf16 compute).
                peer = copy.deepcopy(truth).to(torch.bfloat16)
                result["logits"] = (
                    peer(input_ids=ids.to(request["device"]), use_cache=False).logits[0].float().cpu()
                )
    return result


def lora_name(parameter_name: str) -> str:
    """PEFT parameter name -> the key it has in a saved adapter (adapter name dropped)."""
    return parameter_name.replace(".default", "")


def run_lora(request: dict, job: dict) -> dict:
    from peft import LoraConfig, get_peft_model

    model = _load_model(request)
    high = zoo_tokenizer.regular_token_count(_tokenizer(request))
    torch.manual_seed(request["init_seed"])
    config = LoraConfig(
        r=request["r"],
        lora_alpha=request["alpha"],
        lora_dropout=0.0,
        bias="none",
        target_modules=request["targets"],
        init_lora_weights=False,  # random A and B: both get non-zero gradients
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(request["b_scale"])
    model.save_pretrained(job["adapter_out"])
    ids = inputs.random_ids(request["seed"], request["batch"], request["seq_len"], high).to(request["device"])
    result = {
        "input_ids": ids.cpu(),
        **_loss_and_grads(model, ids, request),
        "adapter_dir": job["adapter_out"],
    }
    if needs_truth(request):
        from peft import PeftModel

        base = model.get_base_model() if request.get("quantization") else None
        truth = _truth_model({**request, "adapter_dir": None}, peer=base)
        truth = PeftModel.from_pretrained(truth, job["adapter_out"], is_trainable=True)
        result["truth"] = _loss_and_grads(truth, ids, {"dtype": "fp32"})
    return result


def _loss_and_grads(model, ids, request: dict) -> dict:
    """Loss and LoRA gradients of one training step, under bf16 autocast where the request
    says so (as a Trainer with bf16=True runs it, and as the candidate's fused-QKV cases do)."""
    import contextlib

    model.train()  # lora_dropout is 0, so train mode changes nothing numerically
    autocast = (
        torch.autocast("cuda", dtype=DTYPES[request["autocast"]])
        if request.get("autocast")
        else contextlib.nullcontext()
    )
    with autocast:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {lora_name(n): p.grad.float().cpu() for n, p in model.named_parameters() if "lora_" in n}
    return {"loss": loss.item(), "grads": grads}


class RouterGaps:
    """Records each token's gap between the k-th and (k+1)-th router logit, per forward call.

    A Qwen3-MoE token whose gap is tiny can be routed to other experts by rounding alone,
    which changes that token's output by O(1): steps that depend on such a token are not
    decidable, however large the final logit margin.
    """

    def __init__(self, model) -> None:
        self.top_k = model.config.num_experts_per_tok
        self.routers = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
        self.gaps: list[torch.Tensor] = []  # one per router call, in call order
        self._handles = [m.register_forward_hook(self._hook) for m in self.routers]

    def _hook(self, module, args, output) -> None:
        logits = output[0] if isinstance(output, tuple) else output  # v5 router tuple, v4 Linear
        top = logits.float().topk(self.top_k + 1, dim=-1).values
        self.gaps.append((top[:, self.top_k - 1] - top[:, self.top_k]).detach().cpu())

    def per_step_own(self, mask: torch.Tensor, steps: int) -> torch.Tensor:
        """batch x steps: the smallest router gap (over layers) of the token step s feeds in:
        the prompt's real tokens for step 0, generated token s-1 after. A rounding-flipped
        expert choice changes that step's logits by O(1) (and later steps only through one
        cached token among many)."""
        for handle in self._handles:
            handle.remove()
        layers, batch = len(self.routers), mask.shape[0]
        out = torch.empty((batch, steps))
        for step in range(steps):
            gaps = [g.view(batch, -1) for g in self.gaps[step * layers : (step + 1) * layers]]
            if step == 0:
                gaps = [g.masked_fill(mask == 0, float("inf")) for g in gaps]
            out[:, step] = torch.stack([g.min(dim=1).values for g in gaps]).min(dim=0).values
        return out

    def per_step_min(self, mask: torch.Tensor, steps: int) -> torch.Tensor:
        """batch x steps: the smallest router gap among the tokens step s depends on
        (the real prompt tokens, then every token generated before it)."""
        for handle in self._handles:
            handle.remove()
        layers, batch = len(self.routers), mask.shape[0]
        out = torch.empty((batch, steps))
        running = torch.full((batch,), float("inf"))
        for step in range(steps):  # forward call `step` produces new token `step`
            for gap in self.gaps[step * layers : (step + 1) * layers]:
                gap = gap.view(batch, -1)
                if step == 0:  # prefill: padded positions are masked out, their routing is moot
                    gap = gap.masked_fill(mask == 0, float("inf"))
                running = torch.minimum(running, gap.min(dim=1).values)
            out[:, step] = running
        return out


def _greedy(model, ids, mask, request, pad_id) -> tuple[torch.Tensor, torch.Tensor]:
    """New tokens and, per step, the decision margin: the gap between the top two
    (processed) scores, or a smaller MoE router gap the step depends on."""
    from conformance import decode

    n = request["max_new_tokens"]
    routers = RouterGaps(model) if getattr(model.config, "num_experts_per_tok", None) else None
    out = decode.greedy_generate(
        model, ids, mask, n, pad_id, output_scores=True, return_dict_in_generate=True
    )
    scores = torch.stack(out.scores, dim=1).float()  # batch x steps x vocab
    top2 = scores.topk(2, dim=-1).values
    margins = (top2[..., 0] - top2[..., 1]).cpu()
    if routers:
        margins = torch.minimum(margins, routers.per_step_min(mask, n))
    return out.sequences[:, ids.shape[1] :].cpu(), margins


def decidable_steps(margins: torch.Tensor, threshold: float) -> list[int]:
    """Per row, how many leading steps have a decision margin of at least ``threshold``."""
    out = []
    for row in margins:
        below = (row < threshold).nonzero()
        out.append(int(below[0, 0]) if len(below) else int(row.numel()))
    return out


def run_generate(request: dict, job: dict) -> dict:
    model = _load_model(request)
    tokenizer = _tokenizer(request)
    high = zoo_tokenizer.regular_token_count(tokenizer)
    pad_id = tokenizer.pad_token_id
    best = None
    # Random weights make near-ties likely somewhere; try prompt seeds until every greedy
    # step of every row clears the dtype's margin, else keep the most decidable attempt.
    for attempt in range(request["attempts"]):
        seed = request["seed"] * 100 + attempt
        single = inputs.random_ids(seed, 1, request["single_len"], high)
        batch, batch_mask = inputs.left_padded(seed, request["batch_lens"], high, pad_id)
        parts = {}
        for label, ids, mask in (("single", single, torch.ones_like(single)), ("batch", batch, batch_mask)):
            tokens, margins = _greedy(model, ids, mask, request, pad_id)
            steps = decidable_steps(margins, request["min_margin"])
            parts[label] = {
                "input_ids": ids,
                "attention_mask": mask,
                "new_tokens": tokens,
                "margins": margins,
                "decidable": steps,
            }
        score = sum(sum(p["decidable"]) for p in parts.values())
        if best is None or score > best[0]:
            best = (
                score,
                {**parts, "attempt": attempt, "min_margin": request["min_margin"], "pad_id": pad_id},
            )
        if score == request["max_new_tokens"] * (1 + len(request["batch_lens"])):
            break
    return best[1]


def run_decode(request: dict, job: dict) -> dict:
    """Teacher-forced decoding references (conformance/decode.py): per left-padded batch, the
    truth's free-running greedy tokens and its logits at every step and, in reduced precision,
    HF's own logits in that precision forced along the same tokens (the peer)."""
    from conformance import decode

    tokenizer = _tokenizer(request)
    high, pad_id = zoo_tokenizer.regular_token_count(tokenizer), tokenizer.pad_token_id
    n = request["new_tokens"]
    truth_model = _truth_model(request) if needs_truth(request) else _load_model(request)
    batches = []
    for index, lengths in enumerate(request["batches"]):
        ids, mask = inputs.left_padded(request["seed"] * 10 + index, lengths, high, pad_id)
        routers = (
            RouterGaps(truth_model) if getattr(truth_model.config, "num_experts_per_tok", None) else None
        )
        tokens, logits = decode.decode(truth_model, ids, mask, n, pad_id, regular_below=high)
        batches.append({"input_ids": ids, "attention_mask": mask, "new_tokens": tokens, "logits": logits})
        if routers is not None:  # Qwen3-MoE: steps whose own token's expert choice is a near tie
            batches[-1]["router_gaps"] = routers.per_step_own(mask, n)
    if needs_truth(request):
        del truth_model
        peer = _load_model(request)
        for batch in batches:
            batch["truth"] = {"logits": batch["logits"]}
            _, batch["logits"] = decode.decode(
                peer, batch["input_ids"], batch["attention_mask"], n, pad_id, forced=batch["new_tokens"]
            )
    return {"batches": batches, "pad_id": pad_id}


def run_chat(request: dict, job: dict) -> dict:
    # Rendered with the suite's pinned copies of Qwen's published templates (chat_reference.py),
    # never with the shim's: that is what the case judges.
    tokenizer = _tokenizer(request)
    family = zoo.by_name(request["model"]).tokenizer_family
    return {
        "template": tokenizer.chat_template,
        "renders": chat_reference.render_references(tokenizer, family),
    }


HANDLERS = {
    "forward": run_forward,
    "lora": run_lora,
    "generate": run_generate,
    "decode": run_decode,
    "chat": run_chat,
    "rope_facts": run_rope_facts,
}


def main(jobs_path: str) -> int:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    peft_reference.keep_module_targets()  # LoRA where the target names say (PEFT 0.21's MoE remap)
    jobs = json.loads(open(jobs_path, encoding="utf-8").read())
    for job in jobs:
        request = job["request"]
        zoo.build(zoo.by_name(request["model"]))  # normally already built by the client
        start = time.perf_counter()
        result = HANDLERS[request["kind"]](request, job)
        tmp = job["out"] + ".tmp"
        torch.save(result, tmp)
        os.replace(tmp, job["out"])
        print(
            f"oracle: {request['kind']:<8} {request['model']:<16} {request['dtype']:<4} "
            f"{time.perf_counter() - start:6.2f}s",
            flush=True,
        )
    _assert_clean("at end")
    return 0


def serve(reply_fd: int) -> int:
    """Run the job files named on stdin, one per line, until stdin closes; after each, its exit
    code on ``reply_fd`` (a failed batch is logged and answered, and the process goes on)."""
    with os.fdopen(reply_fd, "w", buffering=1, encoding="utf-8") as reply:
        for line in sys.stdin:
            jobs_path = line.strip()
            if not jobs_path:
                continue
            print(f"oracle: jobs {jobs_path}", flush=True)
            try:
                code = main(jobs_path)
            except Exception:  # noqa: BLE001 - the client reads the traceback from the log
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            reply.write(f"{code}\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        sys.exit(serve(int(sys.argv[2])))
    sys.exit(main(sys.argv[1]))
