"""RoPE grid: every RoPE type x window x family, held to the README's RoPE contract.

Each cell loads its model through Unsloth with ``max_seq_length`` = the cell's length and
runs that many tokens. The outcome must be one the contract allows:

- **same**: the loaded model's config describes the checkpoint's own RoPE, and its logits
  match transformers on the checkpoint's config at every position (fp32: rel <= 1e-5);
- **extended**: only past what the config itself covers, with the type kept (plain RoPE:
  linear) and the factor set by the README's rule (base and other parameters unchanged),
  and the logits match transformers given the config the model exposes;
- **refused**: only where transformers' own tables change with the sequence length inside
  ``max_seq_length`` (dynamic NTK, longrope), or where the leg declares the family refused
  (conformance/refusals.py).

Anything else (a silent change of RoPE, a refusal the contract does not allow) fails the cell.
Controls (Llama, Mistral) are not Qwen: with the shim imported they must compute exactly
what stock Unsloth computes (the shim is reverted in-process for the comparison).

The HF facts (length dependence, whether the exposed RoPE equals the checkpoint's) and every
reference come from the oracle process, batched once per family.
"""

from __future__ import annotations

import gc

import pytest
import torch

from conformance import candidate, inputs, oracle_client, plan, refusals, rope_grid, tolerances, zoo_tokenizer

pytestmark = pytest.mark.rope


def _run_candidate(cell: rope_grid.Cell, dtype: str) -> dict:
    """One cell on the candidate. An exception that is not the shim's refusal ends this cell as
    an error (reported by its own test), never the whole family's batch."""
    try:
        return _load_and_run(cell, dtype)
    except Exception as error:  # noqa: BLE001 - recorded and failed per cell
        return {"outcome": "error", "reason": f"{type(error).__name__}: {error}"[:600]}


def _load_and_run(cell: rope_grid.Cell, dtype: str) -> dict:
    model, tokenizer, refusal = candidate.load_or_refusal(cell.spec, cell.max_seq_length, dtype)
    if refusal is not None:
        return {"outcome": "refused", "reason": refusal}
    try:
        high = zoo_tokenizer.regular_token_count(tokenizer)
        ids = inputs.random_ids(5, 1, cell.max_seq_length, high)
        return {
            "outcome": "loaded",
            "ids": ids,
            "logits": candidate.forward_logits(model, ids).float().cpu(),
            "rope": rope_grid.exposed_rope(model.config),
        }
    finally:
        del model
        gc.collect()
        torch.cuda.empty_cache()


def _run_control(cell: rope_grid.Cell, dtype: str) -> dict:
    """The same load with the shim applied and reverted, in this process."""
    runs = {}
    for label in ("shim", "stock"):
        if label == "stock":
            candidate.shim.revert()
        try:
            runs[label] = _run_candidate(cell, dtype)
        finally:
            if label == "stock":
                candidate.shim.apply()
    return runs


def _evaluate(cells: list[rope_grid.Cell], settings) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for cell in cells:
        print(f"[rope grid] {cell}", flush=True)
        if cell.control and candidate.shim_active():
            results[str(cell)] = {"control": _run_control(cell, settings.dtype)}
        else:
            results[str(cell)] = _run_candidate(cell, settings.dtype)
    # Every HF fact and reference in one oracle process.
    client = oracle_client.Oracle()
    requests, slots = [], []
    for cell in cells:
        result = results[str(cell)]
        run = result["control"]["shim"] if "control" in result else result
        rope = run.get("rope")
        asks = {
            "facts": plan.rope_facts(cell, rope),
            "same": plan.rope_forward(cell, "fp32", settings.device),
        }
        if rope is not None:
            asks["exposed"] = plan.rope_forward(cell, "fp32", settings.device, rope)
        if settings.dtype != "fp32":  # the peer: HF in the leg's dtype (bounds from its rounding)
            asks["same_peer"] = plan.rope_forward(cell, settings.dtype, settings.device)
            if rope is not None:
                asks["exposed_peer"] = plan.rope_forward(cell, settings.dtype, settings.device, rope)
        for key, request in asks.items():
            slots.append((str(cell), key))
            requests.append(request)
    for (name, key), answer in zip(slots, client.fetch(requests)):
        results[name].setdefault("hf", {})[key] = answer
    return results


_RESULTS: dict[tuple[str, str], dict | Exception] = {}


@pytest.fixture
def grid(request, settings):
    """Results of every collected cell of this family and RoPE type (one xdist group), computed on
    the first such cell's call: the group's loads, then its HF references in one oracle process.
    Groups per family and type (not per family) spread the grid, most of a leg's work, over
    the workers (measured before on an H200: one family's batch took 258 s of a 430 s leg)."""
    family = request.node.callspec.params["cell"].spec.family
    rope_type = request.node.callspec.params["cell"].rope_type
    key = (family, rope_type, settings.dtype, candidate.entry_point_name())
    if key not in _RESULTS:
        mine = [
            item.callspec.params["cell"]
            for item in request.session.items
            if item.originalname == "test_rope_grid"
            and item.callspec.params["cell"].spec.family == family
            and item.callspec.params["cell"].rope_type == rope_type
            and item.callspec.params.get("entry_point") == candidate.entry_point_name()
        ]
        try:
            oracle_client.ensure_zoo({cell.spec.name for cell in mine})
            _RESULTS[key] = _evaluate(mine, settings)
        except Exception as error:  # every cell of the group reports it; none recomputes it
            _RESULTS[key] = error
    if isinstance(_RESULTS[key], Exception):
        raise _RESULTS[key]
    return _RESULTS[key]


def _compare(record, label: str, logits, hf: dict, which: str, dtype: str) -> tuple[str, bool]:
    truth = hf[which]["logits"]
    measured, peer = tolerances.rel_error(logits, truth), None
    if dtype == "fp32":
        bound = tolerances.bound_for("fp32", "rope_grid_logits_rel")
    else:
        peer = tolerances.rel_error(hf[f"{which}_peer"]["logits"], truth)
        bound = tolerances.rounding_bound(peer, "rope_grid_logits_rel")
    ok = measured <= bound
    record(label, measured, bound, dtype, ok, peer=peer)
    return f"{label} = {measured:.3g} (bound {bound:.3g})", ok


@pytest.mark.parametrize(
    "cell",
    [
        pytest.param(c, marks=pytest.mark.xdist_group(f"rope_grid-{c.spec.family}-{c.rope_type}"))
        for c in rope_grid.cells()
    ],
    ids=str,
)
def test_rope_grid(cell, grid, settings, record):
    result = grid[str(cell)]
    facts = result["hf"]["facts"]
    covered = rope_grid.coverage(cell.spec)
    where = (
        f"{cell}: {cell.rope_type} {cell.spec.scaling}, theta {cell.spec.theta:g}, max_position_embeddings "
        f"{cell.spec.max_position_embeddings}, covers {covered}, max_seq_length {cell.max_seq_length}"
    )
    if "control" in result:
        shim_run, stock_run = result["control"]["shim"], result["control"]["stock"]
        assert (shim_run["outcome"], shim_run.get("reason")) == (
            stock_run["outcome"],
            stock_run.get("reason"),
        ), (
            f"control changed by the shim: {shim_run.get('reason')} vs stock {stock_run.get('reason')}. {where}"
        )
        if shim_run["outcome"] == "loaded":
            assert shim_run["rope"] == stock_run["rope"], f"{where}: exposed RoPE differs with the shim"
            diff = (shim_run["logits"] - stock_run["logits"]).abs().max().item()
            record("control_shim_vs_stock_max_abs", diff, 0.0, settings.dtype, diff == 0.0)
            assert diff == 0.0, f"{where}: logits differ from stock Unsloth by {diff:.3g}"
        return
    if result["outcome"] == "error":
        pytest.fail(f"load or forward raised: {result['reason']}. {where}", pytrace=False)
    if result["outcome"] == "refused":
        allowed = facts["length_dependent"] or refusals.expected(cell.spec.family) is not None
        assert allowed, f"refused where the contract allows no refusal: {where}\n  {result['reason']}"
        pytest.xfail(result["reason"])  # "refused by unsloth_qwen_compat: ..." or "refused by Unsloth: ..."
    rope = result["rope"]
    if facts["exposed_same"]:
        message, ok = _compare(record, "logits_rel", result["logits"], result["hf"], "same", settings.dtype)
        assert ok, f"{message}: the model says it computes the checkpoint's RoPE and does not. {where}"
        return
    # Extended: only past the coverage, the type kept, and right for the config it exposes.
    kind = (rope["scaling"] or {}).get("rope_type", "default")
    expected_kind = "linear" if cell.rope_type == "default" else cell.rope_type
    assert cell.max_seq_length > covered, (
        f"RoPE changed inside the {covered} tokens the config covers: {rope}. {where}"
    )
    assert kind == expected_kind, f"RoPE type changed {cell.rope_type} -> {kind}: {rope}. {where}"
    departures = rope_grid.extension_rule_errors(cell.spec, cell.max_seq_length, rope)
    assert not departures, f"extended, but not by the README's rule: {'; '.join(departures)}. {where}"
    message, ok = _compare(
        record, "logits_rel_vs_exposed", result["logits"], result["hf"], "exposed", settings.dtype
    )
    assert ok, f"{message} against HF given the exposed config {rope}. {where}"
