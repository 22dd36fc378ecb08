"""Private parsers behind :mod:`vhdcore.fsmap` (partition tables, ext, XFS, NTFS, swap)."""
