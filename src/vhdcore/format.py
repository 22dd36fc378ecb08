"""VHD on-disk structures (footer, dynamic header, parent locators, BAT).

Kept for the documented import path; the code lives in vhdcore.vhd.*
(:mod:`vhdcore.vhd.format`).
"""
from __future__ import annotations

from .vhd.format import *  # noqa: F401,F403
from .vhd.format import __all__ as __all__  # noqa: F401
