"""The special token ids every source, objective and model agrees on.

0 = PAD, 1 = BOS, 2 = EOS, 3 = MASK; a source's own tokens start at ``N_SPECIAL``.
"""

from __future__ import annotations

PAD_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3
N_SPECIAL = 4


def word_ids(row: list[int]) -> list[int]:
    """The row's own tokens, without special tokens."""
    return [t for t in row if t >= N_SPECIAL]
