"""Registers the toy method of `toy_block_method` when imported: `SLIMTUNE_PLUGINS=tests.train.toy_block_plugin`
makes `method=toy_halves` available to a `python -m slimtune` process started from the repository root."""

from tests.train.toy_block_method import register

register()
