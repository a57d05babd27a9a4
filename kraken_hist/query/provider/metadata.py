"""What the provider reports about the store: its symbols, each symbol's range, ingestion
progress, and a health check that answers even when the database does not."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from kraken_hist.core.errors import KrakenHistError
from kraken_hist.core.timeutils import ONE_MINUTE
from kraken_hist.query.provider.candle_sql import NEWEST_SQL
from kraken_hist.storage.db import has_timescaledb
from kraken_hist.storage.schema import candle_changes

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class DataRange:
    """First and last stored 1-minute candle of a symbol (``end`` = last + 1 minute)."""

    symbol: str
    first: datetime
    last: datetime

    @property
    def end(self) -> datetime:
        return self.last + ONE_MINUTE

    def to_dict(self) -> dict[str, str]:
        return {"symbol": self.symbol, "first": self.first.isoformat(), "last": self.last.isoformat(),
                "end": self.end.isoformat()}


def check_health(connection: Callable[[], AbstractContextManager[sa.Connection]], now: datetime) -> dict[str, Any]:
    """Database reachability and latency, flavour, newest candle age per symbol and the
    aggregate refresh lag (pending ``candle_changes``) at `now`. Never raises for an outage:
    reports ``ok: False`` with the error instead."""
    report: dict[str, Any] = {"ok": False, "checked_at": now.isoformat()}
    began = time.perf_counter()
    try:
        with connection() as conn:
            conn.execute(sa.text("SELECT 1"))
            latency = (time.perf_counter() - began) * 1000
            version = conn.execute(sa.text("SHOW server_version")).scalar_one()
            timescale = has_timescaledb(conn)
            newest = conn.execute(sa.text(NEWEST_SQL)).all()
            pending, oldest = conn.execute(
                sa.select(sa.func.count(), sa.func.min(candle_changes.c.created_at))
            ).one()
    except (KrakenHistError, sa.exc.SQLAlchemyError) as exc:  # reported, not raised: a health check answers
        log.warning("health check failed: %s", exc, extra={"event": "provider.health_failed"})
        report["database"] = {"reachable": False, "error": str(exc)}
        return report
    report["ok"] = True
    report["database"] = {
        "reachable": True, "latency_ms": round(latency, 3), "server_version": version,
        "timescaledb": timescale,
    }
    report["symbols"] = {
        sym: {"newest_candle": last.isoformat(), "age_seconds": round((now - (last + ONE_MINUTE)).total_seconds(), 3)}
        for sym, last in newest
    }
    report["aggregates"] = {
        "pending_changes": int(pending),
        "oldest_pending": oldest.isoformat() if oldest is not None else None,
        "lag_seconds": round((now - oldest).total_seconds(), 3) if oldest is not None else 0.0,
    }
    return report
