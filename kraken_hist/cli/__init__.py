"""The ``kraken-hist`` command line: one module per command group, registered here."""

from __future__ import annotations

from kraken_hist.cli.main import cli, main

__all__ = ["cli", "main"]
