"""The VHD format: on-disk structures and the layout of files vhdcore writes."""
