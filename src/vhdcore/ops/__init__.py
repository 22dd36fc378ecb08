"""Operations over a chain, one module per job.

* :mod:`~vhdcore.ops.stream`: the merged block stream (``iter_image_blocks``)
  that flatten, ``cat -o``, the imaging job, ``estimate`` and ``repo export``
  read, with its read-ahead thread.
* :mod:`~vhdcore.ops.flatwrite`: writing a flat image from an open chain
  (``write_flat``, behind ``flatten`` and ``cat -o``).
* :mod:`~vhdcore.ops.flatten`: ``flatten``.
* :mod:`~vhdcore.ops.coalesce`: ``coalesce`` (open, check, the write loop);
  :mod:`~vhdcore.ops.coalesce_block` merges one block into the parent and
  places new blocks (the order of a block's writes); :mod:`~vhdcore.ops.checkpoint`
  its checkpoint file and fingerprints; :mod:`~vhdcore.ops.grow` growing the
  parent and the space it needs; :mod:`~vhdcore.ops.readahead` the thread
  that reads the child ahead and starts the parent's writeback.
* :mod:`~vhdcore.ops.relink`: ``relink`` and finding a disk's children.
* :mod:`~vhdcore.ops.compact`, :mod:`~vhdcore.ops.repair`.

This package's ``__init__`` imports nothing: the chain layer uses the block
stream and the flat writer (``cat -o``) without loading the operations.
"""
