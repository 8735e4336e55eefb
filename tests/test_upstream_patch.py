"""The upstream patch series: ``upstream-patch``, ``conformance/patched_wheel.py`` and the patched
Unsloth itself, on the real Unsloth 2026.10.9 wheel (CPU).

The wheel comes from ``$UNSLOTH_QWEN_COMPAT_UPSTREAM_SRC`` (CI downloads it there), a checkout's
``.whl-2026.10/``, or PyPI (``pip download``, cached in ``.conformance_cache/wheels``); the tests
that need it skip, saying why, only when none of those has it. Unsloth's own tests (the
``*.tests.diff`` of the series) need the upstream files they patch, at the series' commit: from
``.venv/upstream-tests/tree`` (``.ci/upstream_tests.sh`` keeps them there), a clone named by
``$UPSTREAM_TESTS_GIT``, or GitHub.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO, requires_unsloth, run_python

RELEASE = "2026.10.9"
SERIES_DIR = REPO / "unsloth_qwen_compat" / "upstream_series" / RELEASE
PATCHED = ("rope_scaling", "lora_target_maps", "qwen2_fused_qkv_bias")

from conformance import patched_wheel  # noqa: E402  (imports neither Unsloth nor the shim)


def _series() -> dict:
    return json.loads((SERIES_DIR / "series.json").read_text(encoding="utf-8"))


def test_the_series_names_registered_patches_and_its_files_exist() -> None:
    from unsloth_qwen_compat.patches import all_patches

    series = _series()
    names = [entry["patch"] for entry in series["patches"]]
    assert names == list(PATCHED)
    assert set(names) <= {patch.name for patch in all_patches()}
    for entry in series["patches"]:
        for key in ("diff", "tests", "description"):
            assert (SERIES_DIR / entry[key]).is_file(), entry[key]
        text = (SERIES_DIR / entry["diff"]).read_text(encoding="utf-8")
        # Paths as in the unpacked wheel, so `patch -p1` / `git apply` work in the folder holding unsloth/.
        assert all(
            line.startswith(("--- a/unsloth/", "+++ b/unsloth/"))
            for line in text.splitlines()
            if line.startswith(("--- ", "+++ "))
        )
        tests = (SERIES_DIR / entry["tests"]).read_text(encoding="utf-8")
        assert all(
            line.startswith(("--- a/tests/", "+++ b/tests/", "--- /dev/null"))
            for line in tests.splitlines()
            if line.startswith(("--- ", "+++ "))
        )
    assert series["local_version"].startswith(f"{RELEASE}+")


def test_every_description_has_the_markers_the_command_fills() -> None:
    for entry in _series()["patches"]:
        text = (SERIES_DIR / entry["description"]).read_text(encoding="utf-8")
        for marker in ("<!-- probe -->", "<!-- reproduction -->", "<!-- measured -->", "<!-- versions -->"):
            assert text.count(marker) == 1, (entry["description"], marker)


def test_no_series_is_a_clear_error() -> None:
    from unsloth_qwen_compat.upstream_patch import SeriesError, load_series

    with pytest.raises(SeriesError, match=f"series exist for: {RELEASE}"):
        load_series("2025.10.12")
    assert load_series(f"{RELEASE}+qwencompat").unsloth == RELEASE  # a local label is the release


# -- the real wheel -----------------------------------------------------------------------------


def _find_wheel() -> tuple[Path | None, str]:
    pattern = f"unsloth-{RELEASE}-*.whl"
    places = [
        os.environ.get("UNSLOTH_QWEN_COMPAT_UPSTREAM_SRC"),
        REPO / ".whl-2026.10",
        REPO / ".conformance_cache" / "wheels",
    ]
    for place in filter(None, places):
        found = sorted(Path(place).glob(pattern))
        if found:
            return found[0], ""
    cache = REPO / ".conformance_cache" / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache), f"unsloth=={RELEASE}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    found = sorted(cache.glob(pattern))
    if found:
        return found[0], ""
    return None, (done.stderr or done.stdout).strip()[-500:]


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory) -> Path:
    """A folder holding only the Unsloth wheel (the stripped GPU wheelhouse copy does as well)."""
    wheel, why = _find_wheel()
    if wheel is None:
        pytest.skip(
            f"no unsloth-{RELEASE} wheel: not in $UNSLOTH_QWEN_COMPAT_UPSTREAM_SRC or .whl-2026.10/, "
            f"and pip download failed ({why})"
        )
    folder = tmp_path_factory.mktemp("wheel")
    shutil.copy2(wheel, folder / wheel.name)
    return folder


def _unpack(wheel_dir: Path, into: Path) -> Path:
    wheel = next(wheel_dir.glob("unsloth-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(into)
    return into


def _tool(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(cwd.parent))
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)


@pytest.mark.parametrize("tool", ["git", "patch"])
def test_each_diff_applies_alone_and_all_apply_in_order(tool, wheel_dir, tmp_path) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    entries = _series()["patches"]
    check = ["git", "apply", "--check"] if tool == "git" else ["patch", "-p1", "--dry-run", "--batch", "-i"]
    apply = (
        ["git", "apply"] if tool == "git" else ["patch", "-p1", "--batch", "--no-backup-if-mismatch", "-i"]
    )
    pristine = _unpack(wheel_dir, tmp_path / "pristine")
    for entry in entries:  # each on the release as shipped
        done = _tool([*check, str(SERIES_DIR / entry["diff"])], pristine)
        assert done.returncode == 0, f"{entry['diff']}: {done.stdout}{done.stderr}"
    for entry in entries:  # and one after the other
        done = _tool([*apply, str(SERIES_DIR / entry["diff"])], pristine)
        assert done.returncode == 0, f"{entry['diff']} after the ones before: {done.stdout}{done.stderr}"
    assert not list(pristine.rglob("*.orig")) and not list(pristine.rglob("*.rej"))


@pytest.fixture(scope="module")
def built(wheel_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("leg") / ".whl-2026.10-upstream"
    patched_wheel.build(wheel_dir, out)
    return out


def test_the_patched_wheel_is_a_wheel_of_the_local_version(built) -> None:
    local = _series()["local_version"]
    wheels = sorted(built.glob("unsloth-*.whl"))
    assert [w.name for w in wheels] == [f"unsloth-{local}-py3-none-any.whl"]
    record = json.loads((built / "patched.json").read_text())
    assert [a["patch"] for a in record["applied"]] == list(PATCHED)
    with zipfile.ZipFile(wheels[0]) as archive:
        info = f"unsloth-{local}.dist-info"
        assert f"Version: {local}" in archive.read(f"{info}/METADATA").decode().splitlines()
        rows = list(csv.reader(io.StringIO(archive.read(f"{info}/RECORD").decode())))
        listed = {row[0] for row in rows}
        assert listed == set(archive.namelist())  # every file, and RECORD itself
        for name, digest, size in rows:
            if not digest:
                continue
            data = archive.read(name)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, int(size)) == (f"sha256={expected}", len(data)), name
        llama = archive.read("unsloth/models/llama.py").decode()
    assert (
        "def _rope_length_dependence(" in llama
        and "_raise_if_unknown_lora_targets(model, target_modules)" in llama
    )


def test_from_a_legs_folder_the_patched_leg_takes_the_rest_from_it(wheel_dir, tmp_path) -> None:
    leg = tmp_path / ".whl-2026.10"
    shutil.copytree(wheel_dir, leg)
    (leg / "peft-0.21.2-py3-none-any.whl").write_bytes(b"a pin of the leg")  # stands in for its pins
    out = tmp_path / ".whl-2026.10-upstream"
    patched_wheel.build(leg, out)
    assert (out / "base.txt").read_text() == "2026.10\n"  # offline_legs.sh: the rest from .whl-2026.10
    assert sorted(p.name for p in out.glob("*.whl")) == [
        f"unsloth-{_series()['local_version']}-py3-none-any.whl"
    ]


def test_a_diff_that_does_not_apply_leaves_no_output(wheel_dir, tmp_path, monkeypatch) -> None:
    broken = tmp_path / "series" / RELEASE
    shutil.copytree(SERIES_DIR, broken)
    diff = broken / "lora_target_maps.diff"
    diff.write_text(diff.read_text().replace("_raise_if_no_lora_targets_left(", "_raise_if_no_targets_left("))
    monkeypatch.setattr(patched_wheel, "SERIES_ROOT", tmp_path / "series")
    out = tmp_path / "out"
    with pytest.raises(patched_wheel.BuildError, match="lora_target_maps.diff does not apply"):
        patched_wheel.build(wheel_dir, out)
    assert not out.exists()
    with pytest.raises(patched_wheel.BuildError, match="not in the series"):
        patched_wheel.build(wheel_dir, out, only=["no_such_patch"])


def _install(folder: Path, target: Path) -> Path:
    wheel = next(folder.glob("unsloth-*.whl"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-compile",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return target


STATUS = """
    import json, unsloth, unsloth_qwen_compat as m
    print(json.dumps({"unsloth_file": unsloth.__file__, "status": m.status()}))
"""


def _status_with(site: Path) -> dict:
    done = run_python(
        STATUS, env={"UNSLOTH_ALLOW_CPU": "1", "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["unsloth_file"].startswith(str(site)), out["unsloth_file"]  # the patched copy ran
    return out["status"]


@requires_unsloth
def test_patched_unsloth_reads_native_and_the_shim_can_be_retired(built, tmp_path) -> None:
    status = _status_with(_install(built, tmp_path / "site"))
    verdicts = {p["name"]: p["verdict"] for p in status["patches"]}
    assert {name: verdicts[name] for name in PATCHED} == dict.fromkeys(PATCHED, "native"), status["patches"]
    assert status["verdict"] == "everything is native: the shim can be retired"
    assert status["environment"]["versions"]["unsloth"] == _series()["local_version"]
    assert status["tested_leg"] == "2026.10"


@requires_unsloth
def test_one_patch_alone_fixes_its_defect_only(wheel_dir, tmp_path) -> None:
    out = tmp_path / "leg"
    patched_wheel.build(wheel_dir, out, only=["lora_target_maps"])
    status = _status_with(_install(out, tmp_path / "site"))
    verdicts = {p["name"]: p["verdict"] for p in status["patches"]}
    assert (verdicts["lora_target_maps"], verdicts["rope_scaling"], verdicts["qwen2_fused_qkv_bias"]) == (
        "native",
        "needed",
        "needed",
    )
    assert status["verdict"] == "shim needed for: rope_scaling, qwen2_fused_qkv_bias"


# -- the command on the installed (stock) Unsloth ------------------------------------------------


@requires_unsloth
def test_upstream_patch_writes_each_needed_fix_with_its_measured_numbers(tmp_path) -> None:
    out = tmp_path / "series"
    done = run_python("", args=["-m", "unsloth_qwen_compat", "upstream-patch", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote 3 patch(es) to {out}" in done.stdout
    names = [f"{i + 1:04d}-{name}" for i, name in enumerate(PATCHED)]
    assert (out / "series").read_text().split() == [f"{n}.diff" for n in names]
    for stem, name in zip(names, PATCHED):
        assert (out / f"{stem}.diff").read_bytes() == (SERIES_DIR / f"{name}.diff").read_bytes()
        assert (out / f"{stem}.tests.diff").read_bytes() == (SERIES_DIR / f"{name}.tests.diff").read_bytes()
        text = (out / f"{stem}.md").read_text()
        assert "<!--" not in text, stem  # every marker filled
        assert "Probed on: " in text and "```python" in text
    rope = (out / "0001-rope_scaling.md").read_text()
    # The committed reports' numbers (conformance-reports/2026.10): stock vs the shim.
    stock = json.loads((REPO / "conformance-reports" / "2026.10" / "stock.json").read_text())
    case = next(
        c for c in stock["cases"] if c["case"] == "test_rope_past_original_window[qwen3-yarn-msl1024]"
    )
    value = f"{case['metrics'][0]['value']:.3g}"
    assert (
        f"| `test_rope_past_original_window[qwen3-yarn-msl1024]` | fail: logits_rel[256:900] {value}" in rope
    )
    assert "RoPE probe grid:" in rope  # the probe's finding on this install


# -- Unsloth's own tests, from the series, on the patched and on the stock tree ------------------

UPSTREAM_FILES = ("tests/__init__.py", "tests/utils/__init__.py", "tests/utils/test_rope_scaling_drift.py")


def _upstream_file(path: str, commit: str) -> bytes | None:
    kept = REPO / ".venv" / "upstream-tests" / "tree" / path
    if kept.is_file():
        return kept.read_bytes()
    clone = os.environ.get("UPSTREAM_TESTS_GIT")
    if clone:
        done = subprocess.run(["git", "-C", clone, "show", f"{commit}:{path}"], capture_output=True)
        if done.returncode == 0:
            return done.stdout
    try:
        url = f"https://raw.githubusercontent.com/unslothai/unsloth/{commit}/{path}"
        with urllib.request.urlopen(url, timeout=20) as response:
            return response.read()
    except Exception:
        return None


@pytest.fixture(scope="module")
def upstream_tests(tmp_path_factory) -> Path:
    """tests/ of the series' upstream commit (the files its diffs touch), the diffs applied."""
    commit = _series()["tests_base"]["commit"]
    tree = tmp_path_factory.mktemp("upstream")
    for path in UPSTREAM_FILES:
        data = _upstream_file(path, commit)
        if data is None:
            pytest.skip(
                f"{path} at {commit[:10]} not found (.venv/upstream-tests, $UPSTREAM_TESTS_GIT, GitHub)"
            )
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_bytes(data)
    for entry in _series()["patches"]:
        tool = "git" if shutil.which("git") else "patch"
        command = ["git", "apply"] if tool == "git" else ["patch", "-p1", "--batch", "-i"]
        done = _tool([*command, str(SERIES_DIR / entry["tests"])], tree)
        assert done.returncode == 0, f"{entry['tests']}: {done.stdout}{done.stderr}"
    (tree / "pytest.ini").write_text("[pytest]\n")
    return tree


def _run_upstream_tests(tree: Path, unsloth_dir: Path) -> dict[str, str]:
    link = tree / "unsloth"  # tests that read upstream's source read this tree's
    if link.is_symlink():
        link.unlink()
    link.symlink_to(unsloth_dir, target_is_directory=True)
    files = [
        "tests/utils/test_extended_rope_scaling_types.py",
        "tests/utils/test_rope_scaling_drift.py",
        "tests/test_lora_target_modules_typo.py",
        "tests/utils/test_lora_qkv_bias.py",
    ]
    report = tree / "report.xml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNSLOTH", "PYTEST"))}
    env.update(UNSLOTH_ALLOW_CPU="1", UNSLOTH_COMPILE_DISABLE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(tree))
    command = [sys.executable, "-P", "-m", "pytest", "-c", str(tree / "pytest.ini"), "--rootdir", str(tree)]
    command += ["--noconftest", "-p", "no:cacheprovider", "-q", f"--junitxml={report}", *files]
    subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=900)
    import xml.etree.ElementTree as ElementTree

    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcomes[name] = (
            "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        )
    return outcomes


@requires_unsloth
def test_unsloths_own_tests_pass_on_the_patched_tree_and_catch_stock(
    upstream_tests, wheel_dir, tmp_path
) -> None:
    stock = _unpack(wheel_dir, tmp_path / "stock") / "unsloth"
    patched = _unpack(wheel_dir, tmp_path / "patched")
    for entry in _series()["patches"]:
        patched_wheel.apply_diff(patched, SERIES_DIR / entry["diff"])
    on_patched = _run_upstream_tests(upstream_tests, patched / "unsloth")
    failed = sorted(n for n, o in on_patched.items() if o == "failed")
    assert on_patched and not failed, failed
    on_stock = _run_upstream_tests(upstream_tests, stock)
    # Each new test file, and the drift test the series edits, catches stock 2026.10.9 (cases of
    # what stock already got right, e.g. llama3 kept, pass there too).
    for module in ("test_extended_rope_scaling_types", "test_lora_target_modules_typo", "test_lora_qkv_bias"):
        mine = {n: o for n, o in on_stock.items() if f".{module}::" in n}
        assert "failed" in mine.values(), (module, mine)
    for name in (
        "tests.utils.test_extended_rope_scaling_types::test_linear_and_yarn_grow_past_their_coverage_and_keep_their_type[rope_scaling1-192-32]",
        "tests.utils.test_extended_rope_scaling_types::test_rope_that_changes_with_the_length_is_refused_with_the_limit[rope_scaling1-33-32]",
        "tests.test_lora_target_modules_typo::test_fast_language_model_get_peft_model_rejects_a_typo_before_peft",
        "tests.utils.test_lora_qkv_bias::test_patch_peft_model_fuses_qwen2_qkv",
    ):
        assert (on_stock[name], on_patched[name]) == ("failed", "passed"), name
    drift = "tests.utils.test_rope_scaling_drift::test_extended_rope_scaling_keeps_llama3_and_carries_theta"
    assert on_stock[drift] == "failed" and on_patched[drift] == "passed"
