#!/usr/bin/env bash
# One command on one GPU (at most 8 minutes on an H200), one script per call:
#   bench    (default) the user-shaped QLoRA run: TRL vs ours at 8B under a 24 GiB cap, tokens/s, memory, pad, MFU,
#            and the long-pair ladder (benchmarks/gpu/bench.py)
#   profile  where a step's time goes, per method (benchmarks/gpu/profile_steps.py)
#   proof    bf16 parity of every attention backend and a small QLoRA run (benchmarks/gpu/proof.py)
#   liger    use_liger_kernel's loss and gradients against float32, beside plain bf16's (benchmarks/gpu/liger_parity.py)
#
#   benchmarks/gpu/run.sh [bench|profile|proof|liger] [OUT_DIR [OPTIONS]]   # on the GPU image; OUT_DIR defaults to $OUT,
#                                                                      # else benchmarks/gpu/out; OPTIONS go to the
#                                                                      # script (bench: --parts main,profile; then
#                                                                      # ORPO_BENCH_BUDGET_S=220 ... --parts ladder,liger)
#   benchmarks/gpu/run.sh [bench|profile|proof|liger] --dry-run [OUT_DIR]   # the same code on CPU at tiny sizes
#
# The GPU image lacks trl, datasets, bitsandbytes and a network: their wheels are fetched beforehand into .whl/
# (benchmarks/gpu/wheels.sh, on a machine with package access) and installed here with --no-index into a temporary
# target put on PYTHONPATH, so the image itself is left as it is.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1

SCRIPT=bench
case "${1:-}" in
  bench|proof) SCRIPT="$1"; shift ;;
  profile) SCRIPT=profile_steps; shift ;;
  liger) SCRIPT=liger_parity; shift ;;
esac
if [[ "${1:-}" == "--dry-run" ]]; then
  OUT_DIR="${2:-${TMPDIR:-/tmp}/orpo-gpu-dry-run}"
  exec python "benchmarks/gpu/$SCRIPT.py" "$OUT_DIR" --dry-run "${@:3}"
fi

OUT_DIR="${1:-${OUT:-benchmarks/gpu/out}}"
EXTRA=("${@:2}")  # options after OUT_DIR go to the script (bench.py --parts ladder,liger, ...)
shopt -s nullglob
WHEELS=(.whl/*.whl)
if [[ ${#WHEELS[@]} -eq 0 ]]; then
  echo "no wheels in .whl/: run benchmarks/gpu/wheels.sh on a machine with package access first" >&2
  exit 2
fi
TARGET="$(mktemp -d "${TMPDIR:-/tmp}/orpo-gpu-site.XXXXXX")"
trap 'rm -rf "$TARGET"' EXIT
python -m pip install --quiet --no-index --no-deps --no-compile --target "$TARGET" "${WHEELS[@]}"
export PYTHONPATH="$TARGET:$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import importlib, sys
missing = []
for name in ("trl", "datasets", "bitsandbytes", "peft", "accelerate", "pyarrow", "pandas", "fsspec", "xxhash", "dill"):
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001
        missing.append(f"{name} ({type(err).__name__}: {err})")
if missing:
    sys.exit("cannot import: " + "; ".join(missing) + ". Add the package to benchmarks/gpu/wheels.sh and rerun it.")
import torch, transformers, trl, datasets, bitsandbytes
print(f"torch {torch.__version__} cuda {torch.version.cuda}, transformers {transformers.__version__}, trl {trl.__version__}, "
      f"datasets {datasets.__version__}, bitsandbytes {bitsandbytes.__version__}", flush=True)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# the script's budget (bench.py reads ORPO_BENCH_BUDGET_S too, default 440 s) + 20 s: install and imports fit in
# the rest of 8 minutes at the default
export ORPO_BENCH_BUDGET_S="${ORPO_BENCH_BUDGET_S:-440}"
timeout "$((ORPO_BENCH_BUDGET_S + 20))" python "benchmarks/gpu/$SCRIPT.py" "$OUT_DIR" "${EXTRA[@]}"
