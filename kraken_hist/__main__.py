"""``python -m kraken_hist`` is the ``kraken-hist`` command."""

from .cli import main

main()
