"""Device-specific speed-ups, applied once by the training setup (and by `slimtune bench`)."""
