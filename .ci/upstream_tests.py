"""Unsloth's own tests for the functions the shim wraps: stock vs shim imported before/after.

Runs the selected upstream test files (pinned, content-hashed) three times with the
repo's venv: ``import unsloth`` only; ``unsloth_qwen_compat`` imported before Unsloth;
and after it. Every test's outcome is compared with the stock run; a difference fails
the check unless ``.ci/upstream_tests_allowed.txt`` lists its node id with the README
patch that explains it (a fix). Run through ``.ci/upstream_tests.sh``.

Where the tests come from (first that works; the tree is kept in .venv/upstream-tests):
  1. the PyPI sdist of unsloth==PIN (what CI can reach). Unsloth published sdists, with
     tests/, up to 2026.3.4 only: 2026.3.5 and later, PIN included, are wheel-only, and
     the wheel has no tests/.
  2. a local clone of unslothai/unsloth holding COMMIT (``--git DIR`` or
     ``UPSTREAM_TESTS_GIT=DIR``), each file checked against SELECTED's sha256.
  3. GitHub's tarball of COMMIT (needs github.com), checked the same way.
COMMIT is the newest upstream commit available when this was written (main on
2026-08-22, ``__version__`` 2026.8.19); the commit of release PIN (uploaded 2026-10-26)
was not available. Tests that fail on stock because they are ahead of or behind PIN
fail the same way in every mode and are not differences.

No GPU: every run sets UNSLOTH_ALLOW_CPU=1, so Unsloth imports its GPU code on the CPU
(upstream's CPU CI does the same, or spoofs CUDA in its conftest). Without it Unsloth
falls back to stock transformers, the shim patches nothing, and nothing could differ.
Upstream's conftest is never loaded (--noconftest); the import order comes from the
plugin .ci/upstream_tests_plugin.py, which pytest loads before any test module.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

PIN = "2026.10.9"
COMMIT = "015bdef0d94a241bcd94eec7a405b1700632180d"
TARBALL = f"https://codeload.github.com/unslothai/unsloth/tar.gz/{COMMIT}"

# Package markers the selected files need to import as tests.utils.*, tests.python.*.
SUPPORT = {
    "tests/__init__.py": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "tests/utils/__init__.py": "587ec59a710dda17d0938a29124d19cd3b8e15801bf468413e21007e5b61d227",
    "tests/python/__init__.py": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
}
# Upstream test files that call, at run time, an Unsloth object the shim replaces or
# wraps (grep of tests/ for the names the patches swap), and run on a CPU without
# model downloads. Left out: files naming those functions only to read their source
# text (AST checks the shim cannot change: test_revision_forwarding,
# test_fast_model_config_passthrough, test_gradient_checkpointing_restore,
# test_map_eos_token, test_gemma4_chat_template, test_change_system_message), files
# loading hub checkpoints on a GPU (saving/, qlora/, fast_inference/, test_packing,
# test_qat, test_batched_leftpad_generation_gpu), vllm_compat/test_extended_module_imports
# (re-imports unsloth under a CUDA spoof), and files where the name is PEFT's own or
# only in a comment.
SELECTED = {
    "tests/utils/test_rope_scaling_drift.py": (
        "444a17fe73abc03ff8c3d3eab4f2ef3eb0af6b2d86f2b7193cfeb5e33741a718",
        "llama._extended_rope_scaling, LlamaRotaryEmbedding (rope_scaling)",
    ),
    "tests/utils/test_prepare_inputs_leftpad.py": (
        "295ff2159d547b060f1f3d68a6dffdc6082ceed0690e515100e81e127632755e",
        "llama._fast_prepare_inputs_for_generation (kv_cache_left_padding)",
    ),
    "tests/python/test_get_chat_template_escaping.py": (
        "33acb45d296f77abaca3e509b5f26cabd6f66f8255a0ffdbbd7a37d17840bfee",
        "every CHAT_TEMPLATES / DEFAULT_SYSTEM_MESSAGE entry (chat_templates)",
    ),
    "tests/test_finetune_last_n_layers.py": (
        "331304b87e76adca4a0e43bbe5bfeb2636d6557076bba08c3e3dd43889eef676",
        "FastLlamaModel.get_peft_model signature (lora_target_maps)",
    ),
    "tests/test_public_api_surface.py": (
        "d5853b5cba851cbed120d5b1cc5017bd1e37ea9b9aa63a703600e1bb2398d043",
        "FastLanguageModel.from_pretrained / get_peft_model (lora_target_maps, qwen3_registration)",
    ),
}
MODES = {
    "stock": ["unsloth"],
    "shim-before": ["unsloth_qwen_compat", "unsloth"],
    "shim-after": ["unsloth", "unsloth_qwen_compat"],
}
RUN_ENV = {
    "UNSLOTH_ALLOW_CPU": "1",
    "UNSLOTH_COMPILE_DISABLE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python",
    "TOKENIZERS_PARALLELISM": "false",
}
# The shim's defaults, whatever the calling shell has set.
DROP_ENV = ("UNSLOTH_QWEN_COMPAT_DISABLE", "UNSLOTH_QWEN_COMPAT_FUSED_QKV_BIAS", "PYTEST_ADDOPTS")

ROOT = Path(__file__).resolve().parents[1]
CI = ROOT / ".ci"


class NoSource(Exception):
    pass


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wanted() -> dict[str, str]:
    return {**SUPPORT, **{path: digest for path, (digest, _) in SELECTED.items()}}


def write_tree(tree: Path, files: dict[str, bytes], check: bool) -> None:
    bad = [p for p, d in wanted().items() if check and sha256(files[p]) != d]
    if bad:
        raise NoSource("content differs from the pinned sha256: " + ", ".join(bad))
    shutil.rmtree(tree / "tests", ignore_errors=True)
    for path, data in files.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_bytes(data)


def from_sdist(python: str, dest: Path) -> dict[str, bytes]:
    download = dest / "download"
    sdist = download / f"unsloth-{PIN}.tar.gz"
    if not sdist.exists():
        download.mkdir(parents=True, exist_ok=True)
        cmd = [python, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        done = subprocess.run([*cmd, "-d", str(download), f"unsloth=={PIN}"], capture_output=True, text=True)
        if done.returncode != 0 or not sdist.exists():
            raise NoSource(f"PyPI has no sdist of unsloth=={PIN} (wheel-only; the wheel has no tests/)")
    prefix = f"unsloth-{PIN}/"
    with tarfile.open(sdist) as tar:
        files = {}
        for path in wanted():
            try:
                files[path] = tar.extractfile(prefix + path).read()  # type: ignore[union-attr]
            except (KeyError, AttributeError):
                raise NoSource(f"{sdist.name} has no {path}") from None
    return files


def from_git(repo: str) -> dict[str, bytes]:
    files = {}
    for path in wanted():
        done = subprocess.run(["git", "-C", repo, "show", f"{COMMIT}:{path}"], capture_output=True)
        if done.returncode != 0:
            raise NoSource(f"{repo} has no {COMMIT[:10]}:{path}")
        files[path] = done.stdout
    return files


def from_github() -> dict[str, bytes]:
    try:
        with urllib.request.urlopen(TARBALL, timeout=20) as response:
            data = response.read()
    except Exception as exc:
        raise NoSource(f"cannot download {TARBALL}: {exc}") from None
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            path = member.name.split("/", 1)[-1]
            if path in wanted():
                files[path] = tar.extractfile(member).read()  # type: ignore[union-attr]
    missing = sorted(set(wanted()) - set(files))
    if missing:
        raise NoSource(f"the tarball of {COMMIT[:10]} has no {', '.join(missing)}")
    return files


def fetch(python: str, dest: Path, git: str | None) -> tuple[Path, str]:
    tree = dest / "tree"
    stamp = tree / ".source"
    if stamp.exists() and all((tree / p).exists() for p in wanted()):
        source = stamp.read_text().strip()
        fresh = source.startswith("sdist") or all(
            sha256((tree / p).read_bytes()) == d for p, d in wanted().items()
        )
        if fresh:
            return tree, source + " (kept)"
    tree.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    tried = []
    attempts = [("sdist", lambda: from_sdist(python, dest), False)]
    if git:
        attempts.append((f"git {git} @ {COMMIT[:10]}", lambda: from_git(git), True))
    attempts.append((f"github tarball @ {COMMIT[:10]}", from_github, True))
    for name, get, check in attempts:
        try:
            write_tree(tree, get(), check)
        except NoSource as exc:
            tried.append(f"{name}: {exc}")
            continue
        source = f"sdist unsloth-{PIN}.tar.gz" if name == "sdist" else name
        stamp.write_text(source + "\n")
        return tree, source
    raise NoSource("no source for the upstream tests:\n  " + "\n  ".join(tried))


def readme_patches() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## The patches", 1)[-1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M))


def read_allowed(path: Path) -> tuple[dict[str, str], list[str]]:
    allowed, problems = {}, []
    if not path.exists():
        return allowed, problems
    patches = readme_patches()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        nodeid, _, reason = line.partition(" # ")
        nodeid, reason = nodeid.strip(), reason.strip()
        named = {p for p in patches if re.search(rf"\b{p}\b", reason)}
        if not reason or not named:
            problems.append(
                f"{path.name}:{number}: the reason must name a patch of README's table ({line!r})"
            )
        else:
            allowed[nodeid] = reason
    return allowed, problems


def run_mode(python: str, tree: Path, mode: str, results: Path) -> dict:
    out = results / f"{mode}.json"
    log = results / f"{mode}.log"
    out.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    env.update(RUN_ENV)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CI), os.environ.get("PYTHONPATH")]))
    env["UPSTREAM_TESTS_IMPORT_ORDER"] = ",".join(MODES[mode])
    env["UPSTREAM_TESTS_RESULTS"] = str(out)
    cmd = [python, "-P", "-m", "pytest", "-c", str(tree / "pytest.ini"), "--rootdir", str(tree)]
    cmd += ["-p", "upstream_tests_plugin", "--noconftest", "-p", "no:cacheprovider", "-q", "--tb=short"]
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run([*cmd, *SELECTED], cwd=tree, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode not in (0, 1) or not out.exists():
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        raise RuntimeError(f"pytest ({mode}) exited {done.returncode}; {log}:\n" + "\n".join(tail))
    return json.loads(out.read_text(encoding="utf-8"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=str(ROOT / ".venv" / "bin" / "python"))
    parser.add_argument("--dest", default=str(ROOT / ".venv" / "upstream-tests"))
    parser.add_argument("--git", default=os.environ.get("UPSTREAM_TESTS_GIT"), help="a clone holding COMMIT")
    parser.add_argument("--allowed", default=str(CI / "upstream_tests_allowed.txt"))
    args = parser.parse_args()
    started = time.monotonic()
    python, dest = args.python, Path(args.dest)

    probe = "import importlib.metadata as m, importlib.util as u;"
    probe += "print(m.version('unsloth')); print(u.find_spec('unsloth').submodule_search_locations[0])"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"upstream tests: cannot read unsloth in {python}:\n{done.stderr}", file=sys.stderr)
        return 2
    installed, package_dir = done.stdout.split()
    if installed != PIN:
        print(f"upstream tests: pinned to unsloth {PIN}, {python} has {installed}", file=sys.stderr)
        return 2
    allowed, problems = read_allowed(Path(args.allowed))
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    try:
        tree, source = fetch(python, dest, args.git)
    except NoSource as exc:
        print(f"upstream tests: {exc}", file=sys.stderr)
        return 3
    # Tests that read upstream's source (REPO_ROOT / "unsloth" / ...) read the installed one.
    link = tree / "unsloth"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(package_dir, target_is_directory=True)
    (tree / "pytest.ini").write_text("[pytest]\n")  # keeps upstream's pyproject options out
    results = dest / "results"
    results.mkdir(parents=True, exist_ok=True)

    print(f"upstream tests: unsloth {PIN}; {len(SELECTED)} files from {source}")
    runs, broken = {}, []
    for mode in MODES:
        run_started = time.monotonic()
        try:
            runs[mode] = run = run_mode(python, tree, mode, results)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 2
        counts: dict[str, int] = {}
        for entry in run["outcomes"].values():
            counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
        applied = [p["name"] for p in run["shim"] if p["action"] == "applied"]
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        print(
            f"  {mode:<12} {summary}; shim applied: {', '.join(applied) or '-'}"
            f"  ({time.monotonic() - run_started:.0f}s)"
        )
        if run["import_error"]:
            broken.append(f"{mode}: {run['import_error'].strip().splitlines()[-1]}")
        if run["unsloth_version"] != PIN or not str(run["unsloth_file"]).startswith(package_dir):
            broken.append(f"{mode}: imported unsloth {run['unsloth_version']} from {run['unsloth_file']}")
        if mode == "stock" and run["shim"]:
            broken.append("stock: unsloth_qwen_compat was imported")
        if mode == "stock":
            print(f"  {'':<12} unsloth from {Path(run['unsloth_file']).parent}")
        elif run["shim_file"] and not str(run["shim_file"]).startswith(str(ROOT)):
            print(f"  {'':<12} unsloth_qwen_compat from {Path(run['shim_file']).parent}")
        if mode != "stock" and not applied:
            broken.append(f"{mode}: the shim applied no patch, so the comparison checks nothing")

    stock = runs["stock"]["outcomes"]
    nodeids = sorted(set().union(*(run["outcomes"] for run in runs.values())))
    rows, unlisted, used = [], 0, set()
    for nodeid in nodeids:
        outcomes = {m: runs[m]["outcomes"].get(nodeid, {"outcome": "absent", "message": ""}) for m in MODES}
        base = outcomes["stock"]["outcome"]
        if all(o["outcome"] == base for o in outcomes.values()):
            continue
        if nodeid in allowed:
            verdict = f"allowed: {allowed[nodeid]}"
            used.add(nodeid)
        else:
            verdict, unlisted = "NOT ALLOWED", unlisted + 1
        rows.append((nodeid, outcomes, verdict))

    print(f"\n{len(nodeids)} tests ({len(stock)} in stock); {len(rows)} differ from stock")
    if rows:
        header = ("test", *MODES, "verdict")
        table = [header] + [(n, *(o[m]["outcome"] for m in MODES), v) for n, o, v in rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
        for row in table:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        for nodeid, outcomes, _ in rows:
            for mode in MODES:
                message = outcomes[mode]["message"]
                if outcomes[mode]["outcome"] != outcomes["stock"]["outcome"] and message:
                    print(f"  {mode}: {nodeid}\n      {message}")
    for nodeid in sorted(set(allowed) - used):
        print(f"  note: {Path(args.allowed).name} lists {nodeid}, which no longer differs")
    for problem in broken:
        print(f"  BROKEN RUN {problem}")
    print(f"logs and outcomes: {results}  ({time.monotonic() - started:.0f}s)")
    if broken or unlisted:
        print(f"upstream tests: FAILED ({unlisted} unlisted difference(s), {len(broken)} broken run(s))")
        return 1
    print("upstream tests: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
