"""One process on one device: the Strategy base class as it is."""

from slimtune.parallel.base import Strategy
from slimtune.registry import STRATEGIES


@STRATEGIES.register("single")
class Single(Strategy):
    """Everything in this process."""
