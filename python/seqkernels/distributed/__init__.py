"""Attention across processes on torch.distributed: context-parallel ring flash attention.

- :func:`ring_flash_attention`: each rank holds a shard of one long sequence; K/V blocks
  travel around a ring of ranks (or are all-gathered), the partial outputs merge by their
  log-sum-exp, and the backward is a ring too.
- :func:`shard_sequence` / :func:`unshard_sequence`: cut a full tensor into this rank's
  shard and put the shards back together, in the ``"contiguous"`` or ``"zigzag"`` layout.
"""

from .ring import ring_flash_attention, shard_sequence, unshard_sequence

__all__ = ["ring_flash_attention", "shard_sequence", "unshard_sequence"]
