# The native extensions are declared here: setuptools reads cffi_modules (amlx._mlxc,
# the C layer over MLX) and ext_modules (amlx._arraytype, Array's C core) from setup().
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (build_ffi.py beside this file)
from build_ffi import arraytype_extension  # noqa: E402

setup(cffi_modules=["build_ffi.py:ffibuilder"], ext_modules=[arraytype_extension()])
