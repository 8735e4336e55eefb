"""The 4-bit reference NF4-rounds the tensors a candidate packs beyond Linear layers (Unsloth's
fused MoE expert stacks), so the NF4 parity case compares like with like (CPU; bitsandbytes'
CPU quantizer; the oracle module runs in its own process, as it refuses one that imported the
shim)."""

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("bitsandbytes")

SCRIPT = textwrap.dedent(
    """
    import torch, bitsandbytes as bnb
    from conformance import oracle

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = torch.nn.Parameter(torch.randn(4, 128, 64))
            self.down_proj = torch.nn.Parameter(torch.randn(4, 64, 64))

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Module()
            self.mlp.experts = Experts()

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([Layer(), Layer()])
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16).float()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quant = {"quant_type": "nf4", "double_quant": True,
             "packed_tensors": ["layers.1.mlp.experts.gate_up_proj", "layers.0.mlp.experts.down_proj"]}
    with torch.no_grad():
        oracle._round_trip_packed(model, quant)
    after = dict(model.named_parameters())
    for name, old in before.items():
        moved = ((after[name] - old).norm() / old.norm()).item()
        print(name, round(moved, 4))
    w = before["model.layers.1.mlp.experts.gate_up_proj"].to(torch.bfloat16)
    data, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    expected = bnb.functional.dequantize_4bit(data, state).float()
    print("exact", torch.equal(expected, after["model.layers.1.mlp.experts.gate_up_proj"]))
    try:
        with torch.no_grad():
            oracle._round_trip_packed(model, {**quant, "packed_tensors": ["layers.7.mlp.experts.down_proj"]})
    except RuntimeError as error:
        print("refused", error)
    """
)


def test_packed_tensors_are_nf4_rounded_and_only_they() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    moved = dict(line.rsplit(" ", 1) for line in done.stdout.splitlines() if line.startswith("model."))
    # NF4 on Gaussian weights moves them by ~9% (relative); untouched tensors not at all.
    assert 0.05 < float(moved["model.layers.1.mlp.experts.gate_up_proj"]) < 0.15
    assert 0.05 < float(moved["model.layers.0.mlp.experts.down_proj"]) < 0.15
    assert float(moved["model.layers.0.mlp.experts.gate_up_proj"]) == 0.0
    assert float(moved["model.layers.1.mlp.experts.down_proj"]) == 0.0
    assert "exact True" in done.stdout
    assert (
        "refused 4-bit reference: packed tensors not in the model: ['layers.7.mlp.experts.down_proj']"
        in done.stdout
    )
