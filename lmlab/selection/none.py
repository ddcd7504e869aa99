"""No selection: train on the whole candidate pool."""

from lmlab.selection.base import Selector


class NoSelection(Selector):
    """Keeps every row of the pool."""
