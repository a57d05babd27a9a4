"""The pair table in the database, and any name → a pair, learning from Kraken when needed.

The first time a name is not known (or the table is older than ``Settings.pairs_max_age``),
the whole ``AssetPairs`` answer is fetched once and stored; afterwards names resolve offline.
Pairs that AssetPairs stops listing are kept and marked ``delisted``; pairs only archives
know are added from their file names (``record_inferred``).

There is no process-wide registry: a service is given one, or uses its database's
(:func:`database_registry`: the built-ins plus that database's table, re-read when a name is
missing, so a pair any process learnt can be fetched and stored by every other). Entry points
build one :class:`PairResolver` per database, whose registry is that same one.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

import psycopg

from kraken_hist.storage.db import connect, libpq_url, translate_errors
from kraken_hist.core.errors import ExchangeTransientError, KrakenHistError, UnknownSymbolError
from kraken_hist.core.pairs import BUILTIN_PAIRS, Pair, PairRegistry, pairs_from_asset_pairs
from kraken_hist.core.timeutils import utcnow

log = logging.getLogger(__name__)

_COLUMNS = ("symbol", "altname", "rest_key", "wsname", "base", "quote", "price_decimals", "lot_decimals",
            "status", "origin", "decimals_inferred")

_UPSERT = """
INSERT INTO pairs AS p (symbol, altname, rest_key, wsname, base, quote, price_decimals, lot_decimals,
                        status, origin, decimals_inferred, names, confirmed_at, updated_at)
VALUES (%(symbol)s, %(altname)s, %(rest_key)s, %(wsname)s, %(base)s, %(quote)s, %(price_decimals)s,
        %(lot_decimals)s, %(status)s, %(origin)s, %(decimals_inferred)s, %(names)s, %(confirmed_at)s, now())
ON CONFLICT (symbol) DO UPDATE
SET altname = EXCLUDED.altname, rest_key = EXCLUDED.rest_key, wsname = EXCLUDED.wsname, base = EXCLUDED.base,
    quote = EXCLUDED.quote, price_decimals = EXCLUDED.price_decimals, lot_decimals = EXCLUDED.lot_decimals,
    status = EXCLUDED.status, origin = EXCLUDED.origin, decimals_inferred = EXCLUDED.decimals_inferred,
    names = EXCLUDED.names, confirmed_at = coalesce(EXCLUDED.confirmed_at, p.confirmed_at), updated_at = now()
WHERE %(origin)s <> 'file_name' OR p.origin = 'file_name'
"""


def read_pairs(conn: psycopg.Connection) -> list[Pair]:
    """Every pair of the table."""
    rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM pairs ORDER BY symbol").fetchall()
    return [Pair(**dict(zip(_COLUMNS, row))) for row in rows]


def write_pairs(conn: psycopg.Connection, pairs: Iterable[Pair], *, confirmed_at: datetime | None = None) -> int:
    """Upsert `pairs` (a pair inferred from a file name never replaces one Kraken listed)."""
    count = 0
    for pair in pairs:
        values = {c: getattr(pair, c) for c in _COLUMNS}
        values.update(names=list(pair.names()), confirmed_at=confirmed_at)
        count += conn.execute(_UPSERT, values).rowcount
    return count


def stored_price_decimals(conn: psycopg.Connection, symbol: str) -> int:
    """The price decimals the database's table holds for `symbol` (a built-in pair's when the
    table does not list it)."""
    try:
        with conn.transaction():
            row = conn.execute("SELECT price_decimals FROM pairs WHERE symbol = %s", (symbol,)).fetchone()
    except psycopg.errors.UndefinedTable:
        row = None
    return int(row[0]) if row is not None else PairRegistry().get(symbol).price_decimals


def table_age(conn: psycopg.Connection) -> datetime | None:
    """When Kraken last confirmed the table (None: never)."""
    row = conn.execute("SELECT max(confirmed_at) FROM pairs WHERE origin = 'asset_pairs'").fetchone()
    return row[0] if row else None


def store_asset_pairs(conn: psycopg.Connection, result: Mapping[str, Mapping[str, Any]], *,
                      now: datetime) -> list[Pair]:
    """Store a whole AssetPairs answer: its pairs confirmed now; pairs it used to list and no
    longer does become ``delisted`` (kept: their history stays readable)."""
    listed = pairs_from_asset_pairs(result)
    with conn.transaction():
        write_pairs(conn, listed, confirmed_at=now)
        conn.execute(
            "UPDATE pairs SET status = 'delisted', updated_at = now() "
            "WHERE origin = 'asset_pairs' AND status <> 'delisted' AND NOT (symbol = ANY(%s))",
            ([p.symbol for p in listed],))
    return listed


class PairResolver:
    """Names → pairs for one database, through the table, Kraken's AssetPairs when a name is
    not known or the table is stale, and the registry every service of this process uses.

    `fetch_asset_pairs` returns the raw ``AssetPairs`` result (``KrakenRestClient.get_asset_pairs``);
    without it (offline use) only the table and the built-ins are known.
    """

    def __init__(
        self,
        db_url: str,
        *,
        fetch_asset_pairs: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None,
        max_age: float = 86_400.0,
        registry: PairRegistry | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db_url = db_url
        self.fetch_asset_pairs = fetch_asset_pairs
        self.max_age = timedelta(seconds=max_age)
        self.registry = registry if registry is not None else database_registry(db_url)
        self._clock = clock
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._loaded = False
        self._confirmed: datetime | None = None
        self._refreshed = False  # at most one AssetPairs call per resolver for unknown names

    # --- loading ----------------------------------------------------------------------------

    def load(self) -> PairRegistry:
        """Read the table into the registry (once). No exchange call: known names resolve offline."""
        with self._lock:
            if self._loaded:
                return self.registry
            with translate_errors(), connect(self.db_url, autocommit=True) as conn:
                pairs = read_pairs(conn)
                self._confirmed = table_age(conn)
            for pair in pairs:
                self.registry.add(pair)
            self._loaded = True
        return self.registry

    def stale(self) -> bool:
        """Whether Kraken last confirmed the table longer ago than the allowed age (or never)."""
        self.load()
        return self._confirmed is None or self._clock() - self._confirmed > self.max_age

    def refresh(self, *, quiet: bool = False) -> int:
        """Fetch the whole AssetPairs answer and store it; returns how many pairs it lists.
        With `quiet`, an unreachable exchange is logged and the known pairs kept."""
        if self.fetch_asset_pairs is None:
            raise UnknownSymbolError("(AssetPairs)", [])
        try:
            result = self.fetch_asset_pairs()
        except ExchangeTransientError as exc:
            if not quiet:
                raise
            log.warning("could not refresh the pair table from Kraken (%s); using the %d known pairs",
                        exc, len(self.registry.symbols()), extra={"event": "pairs_refresh_failed"})
            return 0
        with translate_errors(), connect(self.db_url, autocommit=True) as conn:
            listed = store_asset_pairs(conn, result, now=self._clock())
            pairs = read_pairs(conn)
            self._confirmed = table_age(conn)
        for pair in pairs:
            self.registry.add(pair)
        self._refreshed = True
        log.info("pair table refreshed from AssetPairs: %d pairs listed", len(listed),
                 extra={"event": "pairs_refreshed"})
        return len(listed)

    # --- resolving --------------------------------------------------------------------------

    def resolve(self, name: str) -> Pair:
        """The pair `name` denotes; asks Kraken once when it is not known. Raises
        UnknownSymbolError naming the closest known names when Kraken does not have it."""
        registry = self.load()
        if registry.is_known(name):
            return registry.get(name)
        with self._refresh_lock:  # one AssetPairs call however many threads meet unknown names
            if registry.is_known(name):
                return registry.get(name)
            return self._resolve_unknown(name, registry)

    def _resolve_unknown(self, name: str, registry: PairRegistry) -> Pair:
        if self.fetch_asset_pairs is not None and not self._refreshed:
            try:
                self.refresh()
            except ExchangeTransientError as exc:
                raise UnknownSymbolError(str(name), registry.close_matches(str(name)),
                                         unchecked=str(exc).splitlines()[0]) from None
            if registry.is_known(name):
                return registry.get(name)
        raise UnknownSymbolError(str(name), registry.close_matches(str(name)))

    def normalize(self, name: str) -> str:
        return self.resolve(name).symbol

    def expand(self, names: Iterable[str]) -> list[str]:
        """Names, shell patterns (``*/USD``) and ``all`` → canonical symbols, in order, once each."""
        out: list[str] = []
        for name in names:
            if name.strip().lower() == "all" or any(ch in name for ch in "*?["):
                registry = self.load()  # the whole list is wanted: bring it up to date when stale
                if self.fetch_asset_pairs is not None and not self._refreshed and self.stale():
                    self.refresh(quiet=True)
                matched = registry.match(name)
                if not matched:
                    raise UnknownSymbolError(name, registry.close_matches(name.strip("*?[]")))
                out.extend(matched)
            else:
                out.append(self.normalize(name))
        return list(dict.fromkeys(out))

    def record_inferred(self, pair: Pair) -> Pair:
        """Keep a pair inferred from an archive file name (never over one Kraken listed)."""
        with translate_errors(), connect(self.db_url, autocommit=True) as conn:
            write_pairs(conn, [pair])
            stored = next(p for p in read_pairs(conn) if p.symbol == pair.symbol)
        self.registry.add(stored)
        return stored


class DatabaseRegistry(PairRegistry):
    """The pairs one database knows: the built-ins plus its ``pairs`` table, read at first
    use and read again (at most every `reread_after` seconds) when a name is missing, since
    another process may have learnt it since. A database not migrated yet has the built-ins."""

    def __init__(self, db_url: str, *, reread_after: float = 1.0) -> None:
        super().__init__()
        self.db_url = db_url
        self._reread_after = reread_after
        self._read_at: float | None = None
        self._read_lock = threading.Lock()

    def read_table(self) -> int:
        """Add every pair of the table; returns how many it holds (0 without a table)."""
        with self._read_lock:
            self._read_at = time.monotonic()
            try:
                with connect(self.db_url, autocommit=True) as conn:
                    pairs = read_pairs(conn)
            except psycopg.errors.UndefinedTable:
                return 0
            except (psycopg.Error, KrakenHistError) as exc:
                log.debug("pair table of %s not read (%s)", self.db_url, exc)
                return 0
            for pair in pairs:
                self.add(pair)
            return len(pairs)

    def get(self, name: str) -> Pair:
        if self._read_at is None:
            self.read_table()
        try:
            return super().get(name)
        except UnknownSymbolError:
            if time.monotonic() - (self._read_at or 0.0) < self._reread_after:
                raise
        self.read_table()
        return super().get(name)

    def pairs(self) -> list[Pair]:
        if self._read_at is None:
            self.read_table()
        return super().pairs()


_REGISTRIES: dict[str, DatabaseRegistry] = {}
_REGISTRIES_LOCK = threading.Lock()


class GivenOrDatabaseRegistry:
    """A service's ``registry`` attribute: the registry it was given (``self._registry``), else
    the registry of its database (``self.db_url``, looked up on first use: a service may
    resolve its database lazily)."""

    def __get__(self, service: Any, owner: type | None = None) -> PairRegistry:
        if service is None:
            return self  # type: ignore[return-value]
        if service._registry is None:
            service._registry = database_registry(service.db_url)
        return service._registry


def database_registry(db_url: str) -> DatabaseRegistry:
    """The registry of the database at `db_url` (one per database URL in a process, so every
    service on that database sees a pair as soon as any of them learnt it)."""
    key = libpq_url(db_url)
    with _REGISTRIES_LOCK:
        registry = _REGISTRIES.get(key)
        if registry is None:
            registry = _REGISTRIES[key] = DatabaseRegistry(db_url)
        return registry


def resolver_for(settings: Any, db_url: str, *, client: Any = None) -> PairResolver:
    """The resolver an entry point builds: the database's table, Kraken's AssetPairs through
    `client` (or a client built from `settings`, created only if needed)."""
    def fetch() -> Mapping[str, Mapping[str, Any]]:
        if client is not None:
            return client.get_asset_pairs()
        from kraken_hist.kraken.rest_client import KrakenRestClient

        # one quick attempt: a name lookup must not hang on an unreachable exchange
        with KrakenRestClient.from_settings(settings, max_retries=1, timeout=(3.05, 10.0)) as own:
            return own.get_asset_pairs()

    return PairResolver(db_url, fetch_asset_pairs=fetch, max_age=getattr(settings, "pairs_max_age", 86_400.0))


def matches(pattern: str, pair: Pair) -> bool:
    """Whether `pattern` (case-insensitive substring or shell pattern) matches any name of `pair`."""
    wanted = pattern.strip().upper()
    if any(ch in wanted for ch in "*?["):
        return any(fnmatch.fnmatchcase(n, wanted) for n in pair.names())
    return any(wanted in n for n in pair.names())


__all__ = ["BUILTIN_PAIRS", "DatabaseRegistry", "GivenOrDatabaseRegistry", "PairResolver", "database_registry", "stored_price_decimals", "read_pairs", "resolver_for", "store_asset_pairs", "write_pairs"]
