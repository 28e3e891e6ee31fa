#!/usr/bin/env bash
# Download the wheels benchmarks/gpu/run.sh needs on the GPU image (Python 3.12, torch 2.11, transformers 5.17, peft,
# accelerate; no trl, datasets, bitsandbytes or network) into .whl/ at the repository root (git-ignored).
# Run on a machine with package access. One version each, Python 3.12 manylinux x86_64 or pure Python; about 46 MB.
# The image is expected to have pyarrow, pandas, fsspec and numpy (run.sh names any that is missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
# liger-kernel (0.9 MB, Python + Triton): bench.py measures it on packing when it imports
PACKAGES=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 bitsandbytes==0.50.2
  liger-kernel==0.8.5)
python -m pip download --dest .whl --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any "${PACKAGES[@]}"
du -ch .whl/*.whl | tail -n 1
