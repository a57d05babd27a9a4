"""Offline stand-ins for Kraken: a deterministic trade history, a shared market, fake servers.

They ship with the package so tests and people without network access can run the whole
system: ``python -m kraken_hist.testing.fake_rest --port 8080`` serves a generated history on
loopback in Kraken's exact REST formats (see ``fake_rest``).
"""
