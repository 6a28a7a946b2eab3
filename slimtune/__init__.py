"""slimtune: train and fine-tune language models that do not fit the hardware you have."""

__version__ = "0.1.0"

__all__ = ["BlockOptimizer", "BlockOptimizerRatio", "SlimtuneError", "__version__"]


def __getattr__(name):
    # Lazy so that `import slimtune` (and `slimtune --help`) stays fast: torch is imported only when needed.
    if name in ("BlockOptimizer", "BlockOptimizerRatio"):
        from slimtune import optim

        return getattr(optim, name)
    if name == "SlimtuneError":
        from slimtune.errors import SlimtuneError

        return SlimtuneError
    raise AttributeError(f"module 'slimtune' has no attribute {name!r}")
