#!/usr/bin/env bash
# Unsloth's own tests for the functions the shim wraps (pinned upstream files), run with
# `import unsloth` only and with unsloth_qwen_compat imported before and after Unsloth.
# Any outcome that differs from stock fails unless .ci/upstream_tests_allowed.txt lists it
# as a README-listed fix. Needs .venv (bash .ci/setup.sh); CPU only, about a minute.
# Where the tests come from, and why: .ci/upstream_tests.py. Options: --git DIR (a clone of
# unslothai/unsloth holding the pinned commit), --python, --dest, --allowed.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python .ci/upstream_tests.py "$@"
