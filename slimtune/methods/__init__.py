"""Methods: what is trainable and how it is stepped (see `slimtune.methods.base`)."""

from __future__ import annotations

from slimtune.registry import METHODS


def create(cfg):
    """The method a config names (`method=...`), with its own config section."""
    return METHODS.get(cfg.method)(cfg)
