"""vhdcore: fast, safe coalescing, flattening and imaging of Microsoft VHD chains."""
from __future__ import annotations

from ._version import __version__
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors_all
from .kernels import backend

__all__ = ["__version__", "backend", *_errors_all]
