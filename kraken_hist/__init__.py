"""kraken_hist: Kraken's public market history in PostgreSQL, served to synchronous strategy code."""

__version__ = "0.1.0"
