"""Build the Cython kernel.  Metadata lives in pyproject.toml.

VHDCORE_DEBUG_BUILD=1 compiles the kernel with Cython bounds and wraparound
checks on (an out-of-bounds index raises IndexError instead of corrupting
memory); the test suite runs against such a build in CI.
"""
import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("VHDCORE_DEBUG_BUILD", "") not in ("", "0")

# MSVC spells its optimisation flags differently (and only warns about -O3).
# No -march=native: wheels must run on every CPU of their platform tag.
if sys.platform == "win32":
    compile_args = ["/O2"] if not debug else ["/Od", "/Zi"]
else:
    compile_args = ["-O3"] if not debug else ["-O1", "-g"]

directives = {
    "language_level": 3,
    "binding": True,
    "embedsignature": True,
    "boundscheck": debug,
    "wraparound": debug,
    "initializedcheck": debug,
    "cdivision": True,
}

extensions = [
    Extension(
        "vhdcore._merge",
        ["src/vhdcore/_merge.pyx"],
        extra_compile_args=compile_args,
        define_macros=[("VHDCORE_DEBUG_BUILD", "1")] if debug else [],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        compile_time_env={"VHDCORE_DEBUG": bool(debug)},
    ),
)
