"""Builds netpool's one optional C module; everything else is in setup.cfg.

``netpool._speedups`` is the C version of ``netpool/hot_path.py``. It is
optional: where it cannot be compiled (no compiler or Python headers), the
install still succeeds and the Python version serves.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("netpool._speedups", ["netpool/_speedups.c"], optional=True,
                  extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
                                      "-Wno-unused-parameter"]),
    ],
)
