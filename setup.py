"""Builds vattn's native mapping loop (client/vattn/_vmm.c); everything else is in pyproject.toml.

The library is optional: without a C compiler the install goes on, and the
client makes the same driver calls from Python (vattn.native).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("vattn._vmm", ["client/vattn/_vmm.c"], optional=True, py_limited_api=True,
                             extra_compile_args=["-O2", "-Wall"])])
