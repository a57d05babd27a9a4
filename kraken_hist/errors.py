"""One root exception, split into transient (retry later) and permanent (fix something first)."""

from __future__ import annotations


class KrakenHistError(Exception):
    """Root of every error this library raises on purpose."""


class TransientError(KrakenHistError):
    """The same call may succeed later: throttling, an outage, a dropped connection."""


class PermanentError(KrakenHistError):
    """Retrying cannot help: bad input, an unknown pair, a refused request."""


class ConfigurationError(PermanentError):
    """A setting is missing or malformed; the message names the variable."""


class UnknownSymbolError(PermanentError, ValueError):
    """A symbol that is not in the pair registry."""

    def __init__(self, symbol: str, known: list[str]) -> None:
        self.symbol = symbol
        self.known = known
        super().__init__(
            f"unknown symbol {symbol!r}; known symbols: {', '.join(known)} "
            "(add others with PairRegistry.update_from_asset_pairs)"
        )


class DatabaseUnavailableError(TransientError):
    """PostgreSQL did not answer or dropped the connection."""


class ExchangeError(KrakenHistError):
    """Base for errors reported by (or on the way to) the Kraken API."""


class ExchangeTransientError(ExchangeError, TransientError):
    """Throttled, busy, unavailable, timed out: retry with back-off."""


class ExchangePermanentError(ExchangeError, PermanentError):
    """Unknown pair, invalid arguments, or an error we do not know how to treat."""
