"""Build Unsloth with the upstream patch series applied, as a wheel folder for a conformance leg.

    python3 conformance/patched_wheel.py WHEEL_DIR OUT_DIR [--only PATCH ...]

WHEEL_DIR holds a leg's wheels (e.g. ``.whl-2026.10``: one ``unsloth-<release>-*.whl`` and its
pins). The Unsloth wheel is unpacked, every diff of
``unsloth_qwen_compat/upstream_series/<release>/series.json`` (or the ``--only`` ones, in series
order) is applied with ``git apply`` (``patch -p1`` where git is missing), and the tree is
packed again as ``unsloth-<release>+qwencompat`` (the series' local version; RECORD rewritten).
OUT_DIR (e.g. ``.whl-2026.10-upstream``, the leg ``2026.10-upstream`` of offline_legs.sh) gets
that wheel and ``patched.json`` (the source wheel and every diff, with their sha256), and, where
WHEEL_DIR is a leg's folder ``.whl-<leg>``, a ``base.txt`` naming that leg (offline_legs.sh
then takes the leg's other wheels from it); from any other folder, its other wheels and
``skip.txt`` are copied instead. Nothing is written to OUT_DIR unless every diff applies.

Reads the series by path and imports neither Unsloth nor unsloth_qwen_compat, so it runs with
any python3 (the GPU machine's, before anything is installed).
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERIES_ROOT = REPO / "unsloth_qwen_compat" / "upstream_series"
WHEEL_NAME = re.compile(r"^unsloth-(?P<version>[^-]+)-(?P<tags>.+)\.whl$")


class BuildError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_unsloth_wheel(wheel_dir: Path) -> tuple[Path, str, str]:
    """(wheel, version, tags) of the one ``unsloth-*.whl`` in ``wheel_dir``."""
    found = [(p, WHEEL_NAME.match(p.name)) for p in sorted(wheel_dir.glob("unsloth-*.whl"))]
    found = [(p, m) for p, m in found if m]
    if len(found) != 1:
        raise BuildError(
            f"{wheel_dir}: expected exactly one unsloth-<version>-*.whl, found {[p.name for p, _ in found]}; "
            "give the leg's wheel folder (e.g. .whl-2026.10, made by ../shared/gpu/wheelhouse.sh)"
        )
    path, match = found[0]
    return path, match["version"], match["tags"]


def load_series(release: str) -> dict:
    path = SERIES_ROOT / release / "series.json"
    if not path.is_file():
        have = ", ".join(sorted(p.parent.name for p in SERIES_ROOT.glob("*/series.json"))) or "none"
        raise BuildError(f"no upstream patch series for Unsloth {release} (series exist for: {have})")
    return json.loads(path.read_text(encoding="utf-8"))


def apply_diff(tree: Path, diff: Path) -> str:
    """Apply ``diff`` to ``tree`` (the folder holding unsloth/); the tool used, or BuildError."""
    attempts = []
    if shutil.which("git"):
        attempts.append(["git", "apply", "--whitespace=nowarn", str(diff)])
    if shutil.which("patch"):
        attempts.append(["patch", "-p1", "--forward", "--no-backup-if-mismatch", "--batch", "-i", str(diff)])
    if not attempts:
        raise BuildError("neither git nor patch is installed: cannot apply the series")
    # No repository above the tree may capture git apply (a TMPDIR inside a checkout would).
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent))
    errors = []
    for command in attempts:
        # git apply outside a repository applies to the working directory; --check first so a
        # failing diff leaves the tree as it was for the next tool.
        check = command[:2] + ["--check"] + command[2:] if command[0] == "git" else command + ["--dry-run"]
        done = subprocess.run(check, cwd=tree, capture_output=True, text=True, env=env)
        if done.returncode == 0:
            subprocess.run(command, cwd=tree, capture_output=True, text=True, check=True, env=env)
            return command[0]
        errors.append(f"{' '.join(command[:2])}: {(done.stderr or done.stdout).strip()[:800]}")
    raise BuildError(f"{diff.name} does not apply to the unpacked wheel:\n  " + "\n  ".join(errors))


def _record_line(root: Path, path: Path) -> list[str]:
    data = path.read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [path.relative_to(root).as_posix(), f"sha256={digest}", str(len(data))]


def repack(tree: Path, old_version: str, new_version: str, tags: str, out_dir: Path) -> Path:
    """Rename the dist-info to ``new_version``, rewrite METADATA's version and RECORD, and zip."""
    old_info = tree / f"unsloth-{old_version}.dist-info"
    if not old_info.is_dir():
        raise BuildError(f"the wheel has no {old_info.name}")
    info = tree / f"unsloth-{new_version}.dist-info"
    old_info.rename(info)
    metadata = info / "METADATA"
    text = metadata.read_text(encoding="utf-8")
    text, replaced = re.subn(r"(?m)^Version: .*$", f"Version: {new_version}", text, count=1)
    if not replaced:
        raise BuildError("METADATA has no Version line")
    metadata.write_text(text, encoding="utf-8")
    record = info / "RECORD"
    files = sorted(p for p in tree.rglob("*") if p.is_file() and p != record)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for path in files:
        writer.writerow(_record_line(tree, path))
    writer.writerow([record.relative_to(tree).as_posix(), "", ""])
    record.write_text(buffer.getvalue(), encoding="utf-8")
    wheel = out_dir / f"unsloth-{new_version}-{tags}.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        # dist-info last, as wheel builders write it.
        for path in [
            *(p for p in files if info not in p.parents),
            *(p for p in files if info in p.parents),
            record,
        ]:
            archive.write(path, path.relative_to(tree).as_posix())
    return wheel


def build(wheel_dir: Path, out_dir: Path, only: list[str] | None = None) -> Path:
    source, version, tags = find_unsloth_wheel(wheel_dir)
    release = version.split("+", 1)[0]
    series = load_series(release)
    entries = series["patches"]
    if only:
        unknown = sorted(set(only) - {e["patch"] for e in entries})
        if unknown:
            raise BuildError(
                f"--only {unknown}: not in the series ({', '.join(e['patch'] for e in entries)})"
            )
        entries = [e for e in entries if e["patch"] in only]
    root = SERIES_ROOT / release
    with tempfile.TemporaryDirectory(prefix="patched-unsloth-") as scratch:
        tree = Path(scratch) / "tree"
        with zipfile.ZipFile(source) as archive:
            archive.extractall(tree)
        applied = []
        for entry in entries:
            diff = root / entry["diff"]
            tool = apply_diff(tree, diff)
            applied.append(
                {
                    "patch": entry["patch"],
                    "diff": entry["diff"],
                    "sha256": _sha256(diff),
                    "applied_with": tool,
                }
            )
        staging = Path(scratch) / "out"
        staging.mkdir()
        wheel = repack(tree, version, series["local_version"], tags, staging)
        if wheel_dir.name.startswith(".whl-"):
            # A leg's folder: the new leg is that one with this Unsloth (offline_legs.sh's base.txt).
            (staging / "base.txt").write_text(wheel_dir.name[len(".whl-") :] + "\n", encoding="utf-8")
        else:
            for other in sorted(wheel_dir.glob("*.whl")):
                if other != source:
                    shutil.copy2(other, staging / other.name)
            if (wheel_dir / "skip.txt").is_file():
                shutil.copy2(wheel_dir / "skip.txt", staging / "skip.txt")
        (staging / "patched.json").write_text(
            json.dumps(
                {
                    "source_wheel": source.name,
                    "source_sha256": _sha256(source),
                    "version": series["local_version"],
                    "applied": applied,
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        shutil.copytree(staging, out_dir)
    return out_dir / wheel.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="conformance/patched_wheel.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("wheel_dir", type=Path, help="the leg's wheel folder, e.g. .whl-2026.10")
    parser.add_argument(
        "out_dir", type=Path, help="where the patched leg's wheels go, e.g. .whl-2026.10-upstream"
    )
    parser.add_argument("--only", nargs="+", metavar="PATCH", help="apply only these patches of the series")
    args = parser.parse_args(argv)
    try:
        wheel = build(args.wheel_dir, args.out_dir, args.only)
    except BuildError as error:
        print(f"patched_wheel: {error}", file=sys.stderr)
        return 1
    print(f"built {wheel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
