"""optclip's benchmark harness: ``python -m bench``."""
