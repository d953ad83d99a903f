"""megacontext: a hierarchical gist memory of any length for frozen RoPE language models."""

__version__ = "0.1.0"
