"""Holes in the stored history: find them in SQL, fill them from Kraken."""
