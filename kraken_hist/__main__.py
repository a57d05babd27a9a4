"""``python -m kraken_hist`` is the ``kraken-hist`` command."""

from kraken_hist.cli import main

main()
