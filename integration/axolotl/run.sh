#!/usr/bin/env bash
# Axolotl end-to-end checks for orpo-plugin, in a virtualenv of their own.
#
#   integration/axolotl/run.sh           build (or reuse) the venv, then run tests/test_axolotl_integration.py
#   integration/axolotl/run.sh --venv    build (or reuse) the venv and print its python on the last line
#
# The venv holds torch 2.13.0 (installed first, so a CPU build already on the machine is kept), Axolotl 0.19.0
# and this repository (editable, no deps, reinstalled on every call). A marker file records what it was built
# from (python, torch, axolotl, a hash of pyproject.toml); when that changes the venv is rebuilt from nothing.
# A venv it did not build is never deleted: it is used (with this repo installed into it) if torch/axolotl match.
#
# Environment:
#   ORPO_AXOLOTL_VENV    venv path (default: $HOME/.cache/orpo-plugin/axolotl-venv)
#   ORPO_AXOLOTL_PYTHON  interpreter that creates the venv (default: python3)
#   ORPO_TORCH_SPEC      torch requirement (default: torch==2.13.0); ORPO_TORCH_INDEX_URL an extra index for it
set -euo pipefail
shopt -s inherit_errexit 2>/dev/null || true

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VENV=${ORPO_AXOLOTL_VENV:-$HOME/.cache/orpo-plugin/axolotl-venv}
BASE_PYTHON=${ORPO_AXOLOTL_PYTHON:-python3}
TORCH_SPEC=${ORPO_TORCH_SPEC:-torch==2.13.0}
AXOLOTL_SPEC=axolotl==0.19.0
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

log() { echo "[axolotl-venv] $*" >&2; }

expected_marker() {
    local pyver pyhash
    pyver=$("$BASE_PYTHON" -c 'import sys; print(".".join(map(str, sys.version_info[:3])))')
    pyhash=$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)
    printf 'marker-version=1\npython=%s\ntorch=%s\naxolotl=%s\npyproject-sha256=%s\n' \
        "$pyver" "$TORCH_SPEC" "$AXOLOTL_SPEC" "$pyhash"
}

build_venv() {
    if [ -e "$VENV" ]; then
        log "removing stale or incomplete venv $VENV (built by this script)"
        rm -rf "$VENV"
    fi
    mkdir -p "$(dirname "$VENV")"
    log "creating $VENV with $BASE_PYTHON"
    "$BASE_PYTHON" -m venv "$VENV"
    touch "$VENV/.orpo-plugin-built"  # ours from here on: a later call may delete and rebuild it
    local pip=("$VENV/bin/python" -m pip install --progress-bar off)
    if [ -n "${ORPO_TORCH_INDEX_URL:-}" ]; then
        pip+=(--extra-index-url "$ORPO_TORCH_INDEX_URL")
    fi
    log "installing $TORCH_SPEC (first, so Axolotl keeps this build)"
    "${pip[@]}" "$TORCH_SPEC"
    log "installing $AXOLOTL_SPEC"
    "${pip[@]}" "$AXOLOTL_SPEC" "$TORCH_SPEC"
    "$VENV/bin/python" -c 'import axolotl, torch, bitsandbytes; print("axolotl", axolotl.__version__, "torch", torch.__version__)' >&2
}

# A venv this script did not build (no .orpo-plugin-built) is never deleted: it is used if its pins match.
adopt_venv() {
    local have want
    have=$("$VENV/bin/python" -c 'import importlib.metadata as m; print("torch==" + m.version("torch").split("+")[0], "axolotl==" + m.version("axolotl"))' 2>/dev/null || true)
    want="${TORCH_SPEC} ${AXOLOTL_SPEC}"
    if [ "$have" != "$want" ]; then
        log "$VENV was not built by this script and has '${have:-no torch/axolotl}', not '$want'; remove it or set ORPO_AXOLOTL_VENV elsewhere"
        exit 2
    fi
    log "using existing venv $VENV ($have)"
}

ensure_venv() {
    local want
    want=$(expected_marker)
    mkdir -p "$(dirname "$VENV")"
    exec 9>"$VENV.lock"
    flock 9 2>/dev/null || true  # one builder at a time; flock is absent on some systems
    if [ -f "$VENV/.orpo-plugin-marker" ] && [ "$(cat "$VENV/.orpo-plugin-marker")" = "$want" ]; then
        log "reusing $VENV"
        install_repo
    elif [ -f "$VENV/pyvenv.cfg" ] && [ ! -f "$VENV/.orpo-plugin-built" ]; then
        adopt_venv
        install_repo
    elif [ -e "$VENV" ] && [ ! -f "$VENV/.orpo-plugin-built" ]; then
        log "refusing to replace $VENV: it exists and is not a virtualenv"
        exit 2
    else
        build_venv
        install_repo  # before the marker, so a venv with a marker is always complete
        printf '%s\n' "$want" >"$VENV/.orpo-plugin-marker"
    fi
    exec 9>&-
}

install_repo() {
    # editable and without dependencies: the venv keeps Axolotl's pins; reinstalled each call in case the repo moved
    if ! "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$REPO" >&2; then
        "$VENV/bin/python" -m pip install --quiet --no-deps -e "$REPO" >&2
    fi
}

case "${1:-}" in
    --venv)
        ensure_venv
        echo "$VENV/bin/python"
        ;;
    "")
        ensure_venv
        cd "$REPO"
        exec "${PYTEST_PYTHON:-python3}" -m pytest tests/test_axolotl_integration.py -m integration -q
        ;;
    *)
        echo "usage: $0 [--venv]" >&2
        exit 2
        ;;
esac
