"""One file being stored, and what storing it asks of the importer that runs it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import psycopg

from kraken_hist.ingest.archive.layout import Layout
from kraken_hist.ingest.archive.results import Tally
from kraken_hist.ingest.archive.rows import BadRowReport
from kraken_hist.ingest.archive.sources import Source


@dataclass(frozen=True, slots=True)
class FileJob:
    """A file on its way in: its connection (holding the symbol's import lock), where it is
    read from, what it holds, whose it is, and its running counts and bad lines."""

    conn: psycopg.Connection
    source: Source
    layout: Layout
    symbol: str
    report: BadRowReport
    tally: Tally


class ImportHost(Protocol):
    """The importer's settings and services a file's import uses (``BulkCSVImporter``)."""

    chunk_size: int
    strict: bool
    writers: int
    refresh: bool

    @property
    def db_url(self) -> str: ...

    def transaction(self, conn: psycopg.Connection) -> contextlib.AbstractContextManager[Any]:
        """Strict mode: the whole file in one transaction (chunks become savepoints)."""

    def durably(self, conn: psycopg.Connection) -> contextlib.AbstractContextManager[None]:
        """A file's final transaction, committed so that every chunk before it is durable."""

    def price_decimals(self, symbol: str) -> int:
        """The pair's price decimals (the vwap's)."""

    def refresh_window(self, symbol: str, start: datetime, end: datetime) -> bool:
        """Refresh the higher intervals over ``[start, end)``; whether it ran."""

    def into_timescaledb(self) -> bool:
        """Whether the database is TimescaleDB."""
