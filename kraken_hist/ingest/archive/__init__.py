"""Kraken's downloadable CSV history: recognise the files, parse them fast, import them idempotently."""
