#!/usr/bin/env bash
# Create .venv with the package, its test extras and the real Unsloth 2026.10.9 on
# torch 2.13.0 CPU. Safe to re-run. torchvision must not stay installed: the PyPI
# wheel breaks `import unsloth` on a CPU torch (Unsloth pulls it in as a dependency).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned resolve pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]" torch==2.13.0 unsloth==2026.10.9 unsloth_zoo==2026.10.9
.venv/bin/python -m pip uninstall -y -q torchvision
