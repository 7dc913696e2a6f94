# The cffi extension is declared here: setuptools reads cffi_modules from setup().
from setuptools import setup

setup(cffi_modules=["build_ffi.py:ffibuilder"])
