#!/usr/bin/env bash
# Run `tox -e gpu-<leg>` on a GPU machine with no network, from a wheelhouse.
#
#   conformance/offline_tox.sh WHEELHOUSE LEG [tox args...]
#
# The wheelhouse holds the leg's pins, the runtime packages tox.ini's [gpu] section
# lists, and tox with its helpers. tox itself is installed into a scratch folder. When
# python3 is itself a virtualenv holding the machine's CUDA torch, tox envs with
# system_site_packages cannot see it: PARENT_SITE_PACKAGES makes tox.ini's commands_pre
# add that site-packages through a .pth file (the env's own pins still come first).
set -euo pipefail
wheelhouse=$(cd "$1" && pwd)
leg=$2
shift 2
site=${TMPDIR:-/tmp}/unsloth-qwen-compat-tox
if [[ ! -d $site/tox ]]; then
  shopt -s nullglob
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" \
    "$wheelhouse"/{tox,virtualenv,distlib,platformdirs,pyproject_api,cachetools,python_discovery,tomli_w,packaging,filelock,pluggy,colorama}-*.whl
fi
export PIP_NO_INDEX=1 PIP_FIND_LINKS=$wheelhouse
PARENT_SITE_PACKAGES=$(python3 -c "import site; print(site.getsitepackages()[0])")
export PARENT_SITE_PACKAGES
PYTHONPATH=$site python3 -m tox -e "gpu-$leg" "$@"
