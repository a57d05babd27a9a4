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

    def __init__(self, symbol: str, known: list[str], *, unchecked: str | None = None) -> None:
        self.symbol = symbol
        self.known = known
        hint = f"closest known: {', '.join(known)}; " if known else ""
        why = (f"not in the stored pair table, and Kraken's pair list could not be fetched ({unchecked})"
               if unchecked else "Kraken lists no such pair")
        super().__init__(
            f"unknown symbol {symbol!r}: {why}; {hint}`kraken-hist pairs --search TEXT` lists the known pairs"
        )


class DatabaseUnavailableError(TransientError):
    """PostgreSQL did not answer or dropped the connection."""


class ExchangeError(KrakenHistError):
    """Base for errors reported by (or on the way to) the Kraken API."""


class ExchangeTransientError(ExchangeError, TransientError):
    """Throttled, busy, unavailable, timed out: retry with back-off."""


class ExchangeUnreachableError(ExchangeTransientError):
    """No connection to the exchange at all (DNS, refused, connect timeout): nothing answered."""

    reason: str = "connection failed"  # short: "connection failed: connection refused"


class ExchangePermanentError(ExchangeError, PermanentError):
    """Unknown pair, invalid arguments, or an error we do not know how to treat."""
