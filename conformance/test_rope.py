"""RoPE scaling: YaRN logits at positions past original_max_position_embeddings.

The YaRN models have original_max_position_embeddings 256, factor 4, and
max_position_embeddings 320, like Qwen3's published long-context config. Unsloth is
loaded with max_seq_length within max_position_embeddings (320) and beyond it (1024 =
original x factor). Beyond is where stock Unsloth 2026.10.9 swaps YaRN for linear scaling
(rel ~0.5): this case exists to catch that. The error is measured on positions >= 256,
past the window the model was "trained" on, which is what long-context fine-tuning is
about (YaRN's attention factor and interpolated frequencies change earlier positions too;
the forward case covers those).
"""

import pytest

from conformance import candidate, plan, rope_grid, tolerances, zoo

pytestmark = pytest.mark.rope

BEYOND = int(zoo.YARN["original_max_position_embeddings"] * zoo.YARN["factor"])  # 1024
MAX_SEQ_LENGTHS = [zoo.YARN_MAX_POSITIONS, BEYOND]


@pytest.mark.parametrize("max_seq_length", MAX_SEQ_LENGTHS, ids=lambda n: f"msl{n}")
@pytest.mark.parametrize("spec", zoo.YARN_MODELS, ids=str)
def test_rope_past_original_window(spec, max_seq_length, settings, oracle, candidates, record):
    model, _ = candidates.get(spec, max_seq_length, settings.dtype)
    request = plan.forward(spec, settings.dtype, settings.device)
    # Where max_seq_length is past what this transformers' YaRN covers (before transformers
    # 4.56 the factor is derived as max_position_embeddings / original, so only 320 here),
    # the RoPE contract extends the scaling: the model must say so on its config, by the
    # README's rule, and compute what HF computes given that config.
    exposed = rope_grid.exposed_rope(model.config)
    extended = max_seq_length > rope_grid.coverage(spec)
    if extended:
        departures = rope_grid.extension_rule_errors(spec, max_seq_length, exposed)
        assert not departures, f"{spec}: extended, but not by the README's rule: {'; '.join(departures)}"
        request = {**request, "rope": exposed}
    reference = oracle.get(request)
    # Unsloth cuts inputs to max_seq_length: feed at most that many tokens (a causal prefix).
    length = min(max_seq_length, plan.FORWARD_LEN)
    logits = candidate.forward_logits(model, reference["input_ids"][:, :length])
    start = spec.original_max_position_embeddings
    window = {**reference, "logits": reference["logits"][start:length]}
    if "truth" in reference:
        window["truth"] = {"logits": reference["truth"]["logits"][start:length]}
    tolerances.check(
        record,
        [
            (
                f"logits_rel[{start}:{length}]",
                "rope_logits_rel",
                *tolerances.against_truth(window, "logits", logits[start:]),
            )
        ],
        settings.dtype,
        detail=f"{spec}: max_seq_length {max_seq_length} vs max_position_embeddings "
        f"{spec.max_position_embeddings}, YaRN factor {zoo.YARN['factor']}; "
        + (
            f"extended: against HF given the exposed {exposed}"
            if extended
            else "against the checkpoint's RoPE"
        ),
    )
