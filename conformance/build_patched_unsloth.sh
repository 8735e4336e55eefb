#!/usr/bin/env bash
# Build Unsloth with the upstream patch series applied, as the wheel folder of a leg.
#
#   conformance/build_patched_unsloth.sh WHEEL_DIR OUT_DIR [--only PATCH ...]
#   e.g. conformance/build_patched_unsloth.sh .whl-2026.10 .whl-2026.10-upstream
#
# OUT_DIR gets unsloth-<release>+qwencompat (the series of unsloth_qwen_compat/upstream_series/
# applied to the unpacked wheel, RECORD rewritten), patched.json, and base.txt naming the leg
# of WHEEL_DIR (.whl-<leg>), whose other wheels offline_legs.sh then takes. Then `conformance/offline_legs.sh REPORTS 2026.10-upstream@stock` runs the suite
# on it with the shim disabled (see conformance/upstream_proof.sh). Needs python3 and git or patch.
set -euo pipefail
exec python3 "$(dirname "$0")/patched_wheel.py" "$@"
