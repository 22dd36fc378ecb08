"""The VHD format: on-disk structures and the layout of files vhdcore writes.

``format`` (footer, dynamic header, parent locators, BAT; no I/O), ``layout``
(where a new dynamic disk's metadata and blocks go), ``file`` (``VhdFile``:
open, validate, views, read), ``write`` (its write methods, in
crash-consistent order), ``create`` (new files), ``inspect`` (a file that does
not open), ``overlay`` (reading through layers, youngest first).
"""
