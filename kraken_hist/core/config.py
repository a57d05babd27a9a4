"""Settings: one frozen object built from ``KRAKEN_HIST_*`` environment variables at an entry point."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Mapping

from kraken_hist.core.errors import ConfigurationError

PREFIX = "KRAKEN_HIST_"
DEFAULT_REST_URL = "https://api.kraken.com"
DEFAULT_WS_URL = "wss://ws.kraken.com/v2"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REST_LIMITERS = ("auto", "redis", "process")


def default_data_dir() -> Path:
    """Per-user data directory (embedded PostgreSQL, writer spool files)."""
    import platformdirs

    return Path(platformdirs.user_data_dir("kraken_hist", appauthor=False))


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything configurable, with the defaults a new user should get.

    Build it once with ``Settings.from_env()`` at an entry point and pass it down. A public
    constructor given none reads the environment through :func:`settings_or_env`, the one
    place that does, so ``KrakenTradesBackfill()`` and ``kraken-hist backfill`` agree.
    """

    database_url: str | None = None  # None → the embedded PostgreSQL in data_dir
    redis_url: str = DEFAULT_REDIS_URL
    rest_url: str = DEFAULT_REST_URL
    ws_url: str = DEFAULT_WS_URL
    symbols: tuple[str, ...] = ("BTC/USD",)
    data_dir: Path = field(default_factory=default_data_dir)
    rest_min_interval: float = 1.0  # seconds between REST calls, shared by the whole process
    gap_fill_every: float = 300.0  # seconds between beat-scheduled gap fills
    refresh_every: float = 60.0  # seconds between beat-scheduled aggregate refreshes
    backfill_every: float = 900.0  # seconds between beat-scheduled catch-up backfills
    # The REST rate limit: "auto" shares it through Redis at redis_url when that answers (else
    # per process), "redis" always shares it, "process" never does.
    rest_limiter: str = "auto"
    # Who Kraken sees: processes with the same egress id (the same public IP) share one limit.
    egress_id: str = "default"
    rest_pair_min_interval: float | None = None  # seconds between Trades/OHLC calls of one pair (None: rest_min_interval)
    metrics_port: int | None = None  # Prometheus /metrics and /healthz of stream and workers (None: off)
    pairs_max_age: float = 86_400.0  # seconds before the pair table is refreshed from Kraken's AssetPairs
    # TimescaleDB: trades/candles chunks older than this many days are compressed (0: never);
    # applied by `kraken-hist db upgrade`.
    compress_after_days: float = 7.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Read ``KRAKEN_HIST_*`` variables; unset or empty ones keep their defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or raw.strip() == "":
                continue
            values[f.name] = _convert(f.name, raw.strip())
        return cls(**values)  # type: ignore[arg-type]

    def describe(self) -> dict[str, str]:
        """Settings as printable strings (the database password masked)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("database_url", "redis_url") and value:
                value = mask_password(str(value))
            out[f.name] = ",".join(value) if isinstance(value, tuple) else str(value)
        return out


def _convert(name: str, raw: str) -> object:
    variable = PREFIX + name.upper()
    if name == "symbols":
        # Names, patterns (``*/USD``) or ``all``: resolved against the pair table where they are
        # used (pair_store.PairResolver), which may have to ask Kraken first.
        names = tuple(dict.fromkeys(s.strip() for s in raw.split(",") if s.strip()))
        if not names:
            raise ConfigurationError(f"{variable} names no symbol")
        return names
    if name == "data_dir":
        return Path(raw).expanduser()
    if name == "rest_limiter":
        if raw.lower() not in REST_LIMITERS:
            raise ConfigurationError(f"{variable} must be one of {', '.join(REST_LIMITERS)}, got {raw!r}")
        return raw.lower()
    if name == "egress_id":
        if not raw.replace("-", "").replace("_", "").replace(".", "").replace(":", "").isalnum():
            raise ConfigurationError(f"{variable} must be letters, digits, '.', ':', '-' or '_', got {raw!r}")
        return raw
    if name == "metrics_port":
        try:
            port = int(raw)
        except ValueError:
            raise ConfigurationError(f"{variable} must be a TCP port number, got {raw!r}") from None
        if not 0 <= port <= 65535:
            raise ConfigurationError(f"{variable} must be a TCP port number (0-65535), got {raw!r}")
        return port
    if name == "compress_after_days":
        try:
            days = float(raw)
        except ValueError:
            raise ConfigurationError(f"{variable} must be a number of days, got {raw!r}") from None
        if not 0 <= days <= 36_500:
            raise ConfigurationError(f"{variable} must be between 0 (never) and 36500 days, got {raw!r}")
        return days
    if name in ("rest_min_interval", "rest_pair_min_interval", "gap_fill_every", "refresh_every", "backfill_every",
                "pairs_max_age"):
        try:
            number = float(raw)
        except ValueError:
            raise ConfigurationError(f"{variable} must be a number of seconds, got {raw!r}") from None
        if number < 0:
            raise ConfigurationError(f"{variable} must not be negative, got {raw!r}")
        return number
    if name == "database_url" and not raw.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
        raise ConfigurationError(
            f"{variable} must be a postgresql:// or postgresql+psycopg:// URL, got {mask_password(raw)!r}"
        )
    if name == "redis_url" and not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigurationError(f"{variable} must be a redis:// URL, got {raw!r}")
    return raw


def settings_or_env(settings: Settings | None = None) -> Settings:
    """The settings given, else ``KRAKEN_HIST_*`` read now (``Settings.from_env``): how every
    public constructor (backfill, gap filler, writer, importer, provider, tasks) and every
    entry point gets its settings when none are handed in."""
    return settings if settings is not None else Settings.from_env()


def mask_password(url: str) -> str:
    """``postgresql://u:secret@h/db`` → ``postgresql://u:***@h/db``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, at, host = rest.rpartition("@")
    if ":" in creds:
        user, _, password = creds.partition(":")
        if password:
            creds = f"{user}:***"
    return f"{scheme}://{creds}@{host}"
