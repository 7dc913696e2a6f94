#!/usr/bin/env bash
# The Python packages amlx needs that the lent GPU machine's image lacks (llguidance and the
# test tools), beside ../shared/gpu/prepare.sh's MLX halves (which bring cffi, mlx and mlx-lm).
#
#   bash benchmarks/gpu_extras.sh prepare   # here, once: wheels for Python 3.12 into .gpu/c (~14 MB)
#   bash benchmarks/gpu_extras.sh prebuild  # here, after each change to vendor/mlxc or build_ffi.py:
#                                           # amlx._mlxc for the device (~2 min, +3 MB in .gpu/c)
#   bash benchmarks/gpu_extras.sh before REV [DIR]  # here: commit REV's amlx, benchmarks and extension
#                                           # sources in DIR (.gpu/old) with its own amlx._mlxc for the device
#                                           # (~2 min, ~11 MB): the "before" side of `run_gpu.sh before-after`
#   then carry ".gpu/c" in the device call after .gpu/b's setup, and in it:
#   source /tmp/amlx-gpu/env.sh; source .gpu/c/common.sh; ...
#
# common.sh installs the wheels once per machine into /tmp/amlx-extra and puts it and the checkout
# on PYTHONPATH. huggingface_hub is left to the image: a newer one shipped here shadowed the
# image's and broke mlx-lm's import (it wanted httpx2).
#
# prebuild compiles amlx._mlxc here for the device (CPython 3.12, linked against MLX's CUDA build from
# ../shared/gpu/prepare.sh's .gpu/a and .gpu/b, unpacked at the device's path /tmp/amlx-gpu/site so that
# the extension's run path finds it there), stripped, into .gpu/c/ext with a hash of its sources.
# common.sh puts it in place when the checkout's sources have that hash, so a fresh machine skips the
# 2.5-3 minutes of device time build_ffi.py takes there; otherwise it says so and builds.
set -euo pipefail
cd "$(dirname "$0")/.."
sources_hash() { cat build_ffi.py $(find vendor/mlxc -type f | LC_ALL=C sort) | sha256sum | cut -c1-16; }
case "${1:-}" in
  prepare) ;;
  prebuild|before)
    [ -f .gpu/a/lib.part ] && [ -f .gpu/b/lib.part ] || { echo "run bash ../shared/gpu/prepare.sh first"; exit 1; }
    PY=${PYTHON312:-$(command -v python3.12 || true)}
    [ -n "$PY" ] || { echo "prebuild needs a CPython 3.12 (the device's); set PYTHON312"; exit 1; }
    SITE=/tmp/amlx-gpu/site  # (the device's path: the extension's run path names it)
    if [ ! -f $SITE/mlx/lib/libmlx.so ]; then
      mkdir -p $SITE
      cat .gpu/a/lib.part .gpu/b/lib.part | xz -dc | tar x -C $SITE
      xz -dc .gpu/b/include.tar.xz | tar x -C $SITE
    fi
    VENV=/tmp/amlx-py312
    [ -x $VENV/bin/python ] || { "$PY" -m venv $VENV && $VENV/bin/pip install -q "cffi==2.1.1" setuptools; }
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    if [ "$1" = before ]; then
      [ -n "${2:-}" ] || { echo "usage: bash benchmarks/gpu_extras.sh before REV"; exit 2; }
      git archive "$2" amlx benchmarks build_ffi.py vendor | tar x -C "$WORK"
    else
      cp -r build_ffi.py vendor amlx "$WORK"/
    fi
    rm -f "$WORK"/amlx/_mlxc*.so
    (cd "$WORK" && PYTHONPATH=$SITE $VENV/bin/python build_ffi.py > build.log 2>&1) \
      || { tail -30 "$WORK/build.log"; exit 1; }
    if [ "$1" = before ]; then
      DEST=${3:-.gpu/old}
      rm -rf "$DEST" && mkdir -p "$DEST"
      cp -r "$WORK"/amlx "$WORK"/benchmarks "$DEST"/
      rm -f "$DEST"/amlx/embedded/model.safetensors  # (the carry limit; speed.py never loads it)
      strip --strip-unneeded "$DEST"/amlx/_mlxc*.so
      echo "$2 $(git rev-parse "$2")" > "$DEST"/REV
      du -sh "$DEST"
      exit 0
    fi
    mkdir -p .gpu/c/ext
    rm -f .gpu/c/ext/_mlxc*.so .gpu/c/ext/_arraytype*.so
    cp "$WORK"/amlx/_mlxc.cpython-312-*.so "$WORK"/amlx/_arraytype.cpython-312-*.so .gpu/c/ext/
    strip --strip-unneeded .gpu/c/ext/_mlxc*.so .gpu/c/ext/_arraytype*.so
    sources_hash > .gpu/c/ext/sources
    ls -la .gpu/c/ext
    exit 0 ;;
  *) echo "usage: bash benchmarks/gpu_extras.sh prepare | prebuild | before REV"; exit 2 ;;
esac
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
C_DIR="$(dirname "${BASH_SOURCE[0]}")"
if [ ! -d /tmp/amlx-extra ]; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/amlx-extra "$C_DIR"/wheels/*.whl >/dev/null 2>&1
fi
export PYTHONPATH="$PWD:/tmp/amlx-extra:$PYTHONPATH"
# amlx._mlxc and amlx._arraytype for this checkout's sources: kept if built from them on this machine
# already, else the ones built here (gpu_extras.sh prebuild) if built from them, else built now
SOURCES_HASH=$(cat build_ffi.py $(find vendor/mlxc -type f | LC_ALL=C sort) | sha256sum | cut -c1-16)
if ls amlx/_mlxc.cpython-312-*.so amlx/_arraytype.cpython-312-*.so >/dev/null 2>&1 && [ "$(cat /tmp/amlx-mlxc.sources 2>/dev/null)" = "$SOURCES_HASH" ]; then
  :
elif [ "$(cat "$C_DIR/ext/sources" 2>/dev/null)" = "$SOURCES_HASH" ]; then
  cp "$C_DIR"/ext/_mlxc*.so "$C_DIR"/ext/_arraytype*.so amlx/ && echo "$SOURCES_HASH" > /tmp/amlx-mlxc.sources \
    && echo "amlx._mlxc, amlx._arraytype: the prebuilt extensions"
else
  echo "amlx._mlxc: no prebuilt extension for these sources; building (2.5-3 min)"
  if python3 build_ffi.py > /tmp/amlx-build.log 2>&1; then echo "$SOURCES_HASH" > /tmp/amlx-mlxc.sources
  else tail -30 /tmp/amlx-build.log; fi
fi
SH
du -sh .gpu/c
