"""Device and dtype selection, the shared fixtures, markers and the report plugin.

Environment:
- ``CONFORMANCE_DTYPE``: fp32 (default) | bf16 | fp16. Unsloth 2025.3.x rejects fp32, so its
  leg runs with bf16; the tolerance table has a row per dtype.
- ``CONFORMANCE_CACHE``: where the zoo and oracle results live (default: ``zoo.cache_root()``).
- ``UNSLOTH_QWEN_COMPAT_DISABLE=1``: measure stock Unsloth (the shim does nothing).
- ``CONFORMANCE_ENTRY_POINTS``: the Unsloth entry points every case runs through, comma
  separated (default ``FastLanguageModel,FastModel``: each case twice, its id ending in the name).

The device is the GPU when there is one. Without one, Unsloth falls back to running stock
transformers on the CPU: the cases then exercise the suite's own mechanics, not Unsloth's
kernels, and the report says ``candidate cpu-fallback``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never needs the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The fp32 bounds assume true fp32 arithmetic on both sides. torch's TF32 is switched off in
# pytest_configure; Triton's is this variable, read when a kernel compiles: unset, every fp32
# ``tl.dot`` without an explicit precision runs in TF32 on Ampere and newer. Unsloth's
# vendored flash-linear-attention kernels (Qwen3.5 / Qwen3-Next) are such kernels, and their
# fp32 logits left HF fp32 by 1.3e-3 to 1.9e-3 on an H200, stock and shim alike: TF32's size of
# error. It was not all of it: with this setting the fp32 forward of the tiny Qwen3.5 left HF by
# 3.39e-5 there, because the chunked gated-delta-rule forward asks for TF32 explicitly in its
# triangular solve (SOLVE_TRIL_DOT_PRECISION), which this variable does not reach: fp32 runs
# set that one in candidate.py.
os.environ["TRITON_F32_DEFAULT"] = "ieee"
# Triton autotuning results kept on disk (Triton >= 3.3), shared by the workers and the runs
# of a leg: the flash-linear-attention kernels autotune on first use of each head shape, and the hybrid
# models' adapter cases took 350 s each on an H200 while four runs did it at once. A config is
# a kernel's block sizes: another choice changes only the order of fp32 sums, far below the bounds.
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from conformance import (  # noqa: E402
    candidate,  # noqa: E402  (shim, then Unsloth, before transformers)
    oracle_client,
    plan,
    report,
    versions,
    warm_kernels,
    zoo,
)

#: Case families: each is a pytest marker (``-m rope``) and a test module.
FAMILIES = {
    "forward": "logits of 900 tokens vs HF",
    "lora": "LoRA loss and gradients vs HF + PEFT at the same init",
    "generate": "greedy generation: KV cache == no cache == HF, single and left-padded batch",
    "quant4": "Unsloth 4-bit vs HF bitsandbytes NF4, and 4-bit vs bf16 (GPU only)",
    "rope": "RoPE: YaRN past the original window, and the grid of every type x window x family",
    "chat_template": "Qwen chat template rendering and token ids",
    "adapter": "LoRA adapter save and reload (candidate and HF PeftModel)",
    "lora_targets": "a target_modules name matching nothing is an error, not a smaller adapter",
    "fused_qkv": "Qwen2's biased q/k/v run Unsloth's fused LoRA QKV kernel, with PEFT's gradients",
    "fast_path": "Qwen2 / Qwen3 load onto Unsloth's fast Llama kernels, not its generic path",
}

#: A case about FastLanguageModel's fast Llama-kernel path: FastModel loads every model on the
#: generic path, so there such a case is skipped (saying so), never passed.
FAST_LLAMA_PATH_MARKER = "fast_llama_path"


def entry_points() -> list[str]:
    raw = os.environ.get("CONFORMANCE_ENTRY_POINTS", "") or ",".join(candidate.ENTRY_POINTS)
    names = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in candidate.ENTRY_POINTS]
    if unknown or not names:
        raise pytest.UsageError(
            f"CONFORMANCE_ENTRY_POINTS={raw!r}: expected a comma-separated subset of {', '.join(candidate.ENTRY_POINTS)}"
        )
    return names


DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Settings:
    device: str  # "cuda" | "cpu"
    dtype: str  # "fp32" | "bf16" | "fp16"

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"


def _settings() -> Settings:
    dtype = os.environ.get("CONFORMANCE_DTYPE", "fp32").lower()
    if dtype not in DTYPES:
        raise pytest.UsageError(f"CONFORMANCE_DTYPE={dtype!r}: expected one of {DTYPES}")
    return Settings(device="cuda" if torch.cuda.is_available() else "cpu", dtype=dtype)


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--conformance-report",
        metavar="DIR",
        default=None,
        help="write DIR/conformance.json and DIR/conformance.md",
    )


def pytest_configure(config) -> None:
    for name, description in FAMILIES.items():
        config.addinivalue_line("markers", f"{name}: {description}")
    config.addinivalue_line(
        "markers",
        f"{FAST_LLAMA_PATH_MARKER}: checks FastLanguageModel's fast path (skipped through FastModel)",
    )
    # The fp32 bounds assume true fp32 matmuls (see tolerances.py); the oracle does the same.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    settings = _settings()
    config._conformance_settings = settings
    _share_cores_among_workers(config)
    header = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": settings.device,
        "dtype": settings.dtype,
        "candidate_mode": candidate.mode(),
        # What was asked for (e.g. ``-m rope``): a partial run must not read as a whole leg.
        "pytest_args": report.portable_args(config.invocation_params.args),
        "mutation": os.environ.get("CONFORMANCE_MUTATION", ""),
        "entry_points": entry_points(),
        # fla's explicit TF32 solve, set to IEEE fp32 in fp32 runs (candidate.py), or why not.
        "versions": {**versions.collect(), "fla_solve_tril_precision": candidate.LINEAR_ATTENTION_SOLVE},
        "shim": candidate.shim_state(),
        # torch's CPU threads in each process the session starts (None: torch's default).
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    config._conformance_report = report.ConformanceReport(config, header)
    if settings.on_gpu and _xdist_controller(config):
        # Set before the workers start, so they inherit it (warm_kernels.py).
        config._conformance_warm_dir = zoo.cache_root() / "warm" / f"{os.getpid()}-{int(time.time())}"
        os.environ[warm_kernels.DIR_ENV] = str(config._conformance_warm_dir)
        config._conformance_report.warm_dir = config._conformance_warm_dir
        # Decided once, here, and handed to the workers (pytest_configure_node): every worker must
        # collect the same order, and a warm-up may mark the caches while they collect.
        config._conformance_kernels_warm = warm_kernels.all_warm(settings.dtype)
    config.pluginmanager.register(config._conformance_report, "conformance-report")
    # Everything imported so far (torch, transformers, Unsloth's patched modules: ~620k objects)
    # lives as long as the process. Frozen, the garbage collector stops walking it: Unsloth's
    # loaders call gc.collect() many times per model, and each full collection took 0.46 s on a
    # CPU (0.62 s on an H200 machine: 72 s of one worker's 263 s in a profile of the RoPE grid)
    # and takes under 1 ms frozen. Objects made later (models, tensors) are collected as before.
    gc.freeze()


def _share_cores_among_workers(config) -> None:
    """Under pytest-xdist, every process the session starts (the workers, and their reference,
    zoo and warm-up processes: all inherit the controller's environment) gets its share of the
    CPU cores for torch's threads, unless the caller set OMP_NUM_THREADS. By default each starts
    a thread per core: on one H200 machine (16 cores) twelve workers summed 1.9x the RoPE grid's
    case seconds of eight (1468 s vs 768 s) and the leg got no further (423 cases in 414 s vs
    425 in 382 s), with load averages up to 56."""
    if _xdist_controller(config):
        workers = len(getattr(config.option, "tx", None) or []) or int(config.option.numprocesses)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


def _xdist_controller(config) -> bool:
    workers = getattr(config.option, "numprocesses", None)
    return bool(workers) and workers != "0" and not hasattr(config, "workerinput")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """The controller tells each worker whether the hybrid kernels' warm-ups are all in the
    compile caches already (the cases' order: warm_kernels.collection_rank)."""
    node.workerinput["conformance_kernels_warm"] = getattr(node.config, "_conformance_kernels_warm", False)


def _kernels_warm(config) -> bool:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        return bool(workerinput.get("conformance_kernels_warm", False))
    return getattr(config, "_conformance_kernels_warm", False)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids) -> None:
    """The controller starts the hybrid models' kernel warm-ups once the selection is known
    (every worker reports the same selection: the first report starts them)."""
    config = node.config
    if getattr(config, "_conformance_warm_dir", None) and not hasattr(config, "_conformance_warm"):
        config._conformance_warm = warm_kernels.start(
            config._conformance_warm_dir, list(ids), config._conformance_settings.dtype
        )


def pytest_unconfigure(config) -> None:
    for process in getattr(config, "_conformance_warm", []):
        if process.poll() is None:
            process.terminate()


def _spec_of(item_or_request):
    """The zoo model a case loads (a RoPE-grid cell's too), or None."""
    item = getattr(item_or_request, "node", item_or_request)  # a fixture request's case
    params = getattr(getattr(item, "callspec", None), "params", {})
    return params.get("spec") or getattr(params.get("cell"), "spec", None)


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(config, items) -> None:
    """Remember which (family, model) pairs will run, so their references are batched."""
    needed, zoo_names = set(), set()
    for item in items:
        entry = getattr(item, "callspec", None) and item.callspec.params.get("entry_point")
        if entry and entry != "FastLanguageModel" and item.get_closest_marker(FAST_LLAMA_PATH_MARKER):
            item.add_marker(
                pytest.mark.skip(
                    reason=f"{entry} loads every model on Unsloth's generic path: no fast Llama-kernel path to check"
                )
            )
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        spec = params.get("spec")
        for marker in item.iter_markers():
            if marker.name in FAMILIES and spec is not None:
                needed.add((marker.name, spec.name))
        # Every model a case loads, RoPE-grid cells' too: built in one process up front, not one
        # process per grid group under the zoo's lock (35 groups, 15-20 s each, one at a time).
        spec = spec or getattr(params.get("cell"), "spec", None)
        if spec is not None:
            zoo_names.add(spec.name)
    config._conformance_needed = needed
    config._conformance_zoo_names = zoo_names
    # Longest first; while the hybrid kernels are not warm yet, the hybrid models' cases last,
    # those that wait for the slowest warm-up last of all (a stable sort: the order is the same
    # in every worker, as pytest-xdist requires): by the time the workers reach them, the kernel
    # warm-ups (warm_kernels.py) have compiled what they need.
    warm = _kernels_warm(config)
    items.sort(key=lambda item: warm_kernels.collection_rank(item.nodeid, warm))


@pytest.hookimpl(trylast=True)  # after the modules' own parametrize: ids end in the entry point
def pytest_generate_tests(metafunc) -> None:
    # Session-scoped, so pytest runs every case of one entry point before the next one's and
    # module-scoped fixtures that take ``entry_point`` are built once per entry point.
    if "entry_point" in metafunc.fixturenames:
        names = entry_points()
        if _grouped(metafunc):
            # A grouped case (the RoPE grid: one group per family and RoPE type, whose loads and
            # references are batched) is grouped per entry point too: the two halves are separate
            # batches anyway, and 70 groups spread over the workers better than 35.
            names = [pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in names]
        metafunc.parametrize("entry_point", names, indirect=True, scope="session")


def _grouped(metafunc) -> bool:
    """Whether the test's own parameter sets carry an xdist_group mark."""
    return any(
        mark.name == "xdist_group"
        for parametrize in metafunc.definition.iter_markers("parametrize")
        for value in parametrize.args[1]
        for mark in getattr(value, "marks", ())
    )


@pytest.fixture(scope="session", autouse=True)
def entry_point(request) -> str:
    """The Unsloth entry point this case loads, attaches LoRA and switches modes through."""
    candidate.use_entry_point(request.param)
    return request.param


@pytest.fixture(autouse=True)
def _current_entry_point(entry_point) -> None:
    candidate.use_entry_point(entry_point)  # a session fixture is set up once per entry point


@pytest.fixture(autouse=True)
def _hybrid_kernels_warm(request, settings) -> None:
    """A hybrid model's case waits for the session's kernel warm-ups (warm_kernels.py)."""
    spec = _spec_of(request)
    if spec is not None and spec.hybrid:
        request.node._conformance_warm_wait = warm_kernels.wait(
            warm_kernels.needs(request.node.nodeid, settings.dtype), spec.name
        )


@pytest.fixture(autouse=True)
def _model_type_this_transformers_lacks(request, entry_point, settings) -> None:
    """A zoo model whose type the installed transformers lacks (Qwen3.5 on transformers 4) has
    only a config-only checkpoint: its case is the loader's answer to it, which must be the
    shim's declared refusal (conformance/refusals.py), before any reference is asked for."""
    spec = _spec_of(request)
    if spec is None or zoo.transformers_builds(spec):
        return
    oracle_client.ensure_zoo({spec.name})
    model, _ = candidate.load(spec, spec.max_position_embeddings, settings.dtype)  # xfails when refused
    pytest.fail(
        f"{spec}: {entry_point} loaded a {spec.model_type} model the installed transformers cannot build"
    )


@pytest.fixture(scope="session")
def settings(pytestconfig) -> Settings:
    return pytestconfig._conformance_settings


@pytest.fixture(scope="session", autouse=True)
def zoo_models(pytestconfig) -> None:
    """Every zoo model the collected cases load (RoPE-grid cells' included), built up front
    (without Unsloth), each worker's share in one process. The oracle builds the models of its
    requests, but the families with no HF reference (fast_path, lora_targets) load models that
    no request names: selected alone on a fresh cache, they found nothing to load."""
    names = sorted(getattr(pytestconfig, "_conformance_zoo_names", set()))
    start = time.perf_counter()
    if names:
        # This worker's share first, side by side with the others', then everything (waiting
        # only for the models another worker is still building).
        oracle_client.ensure_zoo(oracle_client.worker_share(names, key=str))
        oracle_client.ensure_zoo(names)
    _SESSION_SETUP["zoo_s"] = round(time.perf_counter() - start, 2)


@pytest.fixture(scope="session")
def oracle(pytestconfig, settings) -> oracle_client.Oracle:
    """The HF reference. Every reference the session's cases can name up front is computed
    here, shared out among the pytest-xdist workers (``oracle_client.worker_share``), each
    worker's share in one oracle process."""
    client = oracle_client.Oracle()
    skip = candidate.nf4_skip_modules()
    batch = []
    for family, name in sorted(getattr(pytestconfig, "_conformance_needed", ())):
        if zoo.transformers_builds(zoo.by_name(name)):  # else the case is the loader's refusal
            batch += plan.for_family(family, zoo.by_name(name), settings.dtype, settings.device, skip)
    share = oracle_client.worker_share(batch, client.key)
    start = time.perf_counter()
    if share:
        client.prepare(share)
    _SESSION_SETUP.update(oracle_up_front_s=round(time.perf_counter() - start, 2), oracle_share=len(share))
    return client


#: This worker's session setup, in seconds: reported once, with the first case it runs.
_SESSION_SETUP: dict = {}
_SETUP_REPORTED: set = set()


@pytest.fixture(autouse=True)
def _timing(request):
    """Where a case's seconds went besides the candidate: references (computed, waited for,
    loaded), the kernel warm-up it waited for, and, on a worker's first case, the session's
    setup. report.py keeps it as the case's ``timing``; a slow leg says where its time went."""
    before = dict(oracle_client.TIMING)
    yield
    split = {
        f"oracle_{name}": round(oracle_client.TIMING[name] - before[name], 2)
        for name in ("compute_s", "wait_s", "load_s")
    }
    split["warm_wait_s"] = round(getattr(request.node, "_conformance_warm_wait", 0.0), 2)
    # Each part once, with the first case after it happened (a case without references
    # does not set the oracle up).
    new = {name: value for name, value in _SESSION_SETUP.items() if name not in _SETUP_REPORTED}
    if new:
        split["session_setup"] = new
        _SETUP_REPORTED.update(new)
    request.node.user_properties.append((report.TIMING_PROPERTY, split))


@pytest.fixture(scope="session")
def candidates() -> candidate.ModelCache:
    return candidate.ModelCache()


class Recorder:
    """Stores measured numbers on the test item; report.py turns them into the table."""

    def __init__(self, node) -> None:
        self._node = node

    def __call__(
        self, metric: str, value: float, bound: float, dtype: str, ok: bool, peer: float | None = None
    ) -> None:
        entry = {"metric": metric, "value": float(value), "bound": bound, "dtype": dtype, "ok": bool(ok)}
        if peer is not None:  # a rounding bound: the peer's (HF in the same dtype) own error
            entry["peer"] = float(peer)
        self._node.user_properties.append((report.PROPERTY, entry))

    def note(self, label: str, value: float) -> None:
        """A number worth reporting that has no bound (e.g. how many tokens were compared)."""
        self(label, value, None, "", True)


@pytest.fixture
def record(request) -> Recorder:
    return Recorder(request.node)
