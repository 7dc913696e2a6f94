#!/usr/bin/env bash
# The Python packages amlx needs that the lent GPU machine's image lacks (llguidance and the
# test tools), beside ../shared/gpu/prepare.sh's MLX halves (which bring cffi, mlx and mlx-lm).
#
#   bash benchmarks/gpu_extras.sh prepare   # here, once: wheels for Python 3.12 into .gpu/c (~14 MB)
#   then carry ".gpu/c" in the device call after .gpu/b's setup, and in it:
#   source /tmp/amlx-gpu/env.sh; source .gpu/c/common.sh; python3 build_ffi.py; ...
#
# common.sh installs the wheels once per machine into /tmp/amlx-extra and puts it and the checkout
# on PYTHONPATH. huggingface_hub is left to the image: a newer one shipped here shadowed the
# image's and broke mlx-lm's import (it wanted httpx2).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = prepare ] || { echo "usage: bash benchmarks/gpu_extras.sh prepare"; exit 2; }
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu/c/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_35_x86_64 --platform manylinux_2_31_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .gpu/c/wheels \
  "llguidance>=1.9.1,<2" hypothesis sortedcontainers pytest-asyncio tqdm "scipy-openblas32==0.3.34.481.3" \
  attrs jsonschema jsonschema-specifications referencing rpds-py lark
cat > .gpu/c/common.sh <<'SH'
# sourced on the device after /tmp/amlx-gpu/env.sh (benchmarks/gpu_extras.sh)
if [ ! -d /tmp/amlx-extra ]; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/amlx-extra "$(dirname "${BASH_SOURCE[0]}")"/wheels/*.whl >/dev/null 2>&1
fi
export PYTHONPATH="$PWD:/tmp/amlx-extra:$PYTHONPATH"
SH
du -sh .gpu/c
