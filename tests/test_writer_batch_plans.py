"""The writer's batch statements serve hundreds of pairs in one statement each; they must still
probe the index once per pair and, on TimescaleDB, read only the chunk of the batch's time —
never join the whole table (which a planner may choose for an array it cannot estimate)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from kraken_hist.storage import ownership

from kraken_hist.storage.writer import statements

UTC = timezone.utc
NOW = datetime(2026, 6, 1, tzinfo=UTC)
PAIRS = [f"P{i}/USD" for i in range(200)]


@pytest.fixture
def history(db_url: str) -> str:
    """200 pairs over two years (about a hundred weekly chunks on TimescaleDB)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO trades (symbol, trade_id, time, price, volume, source) "
            "SELECT 'P' || (g %% 200) || '/USD', g, %s - g * interval '2 minutes', 1, 1, 'rest' "
            "FROM generate_series(1, 500000) g", (NOW,))
        conn.execute(
            "INSERT INTO candles (symbol, time, open, high, low, close, vwap, volume, trades, source) "
            "SELECT 'P' || (g %% 200) || '/USD', date_trunc('minute', %s - g * interval '2 minutes'), "
            "1, 1, 1, 1, 1, 1, 1, 'trades' FROM generate_series(1, 500000) g ON CONFLICT DO NOTHING", (NOW,))
        conn.execute("ANALYZE trades")
        conn.execute("ANALYZE candles")
    return db_url


def plan(conn: psycopg.Connection, statement: str, params: object) -> str:
    return "\n".join(row[0] for row in conn.execute("EXPLAIN (ANALYZE, COSTS OFF) " + statement, params))


def test_one_index_probe_per_pair_and_only_the_batch_s_chunk(history: str, timescaledb: bool) -> None:
    minute = int(NOW.timestamp()) // 60 - 30
    meta = {symbol: [10**9, 10**9 + 3, [minute, minute + 1]] for symbol in PAIRS}
    symbols, minutes = [s for s in PAIRS for _ in (0, 1)], [m for _ in PAIRS for m in (minute, minute + 1)]
    with psycopg.connect(history, autocommit=True) as conn:
        plans = {
            "probe": plan(conn, statements.PROBE_TRADES, statements.probe_params(meta)),
            "archive": plan(conn, ownership.ARCHIVE_TOUCHES_ANY, statements.probe_params(meta)),
            "candles": plan(conn, statements.STORED_CANDLES, statements.pairs_params(symbols, minutes)),
            "occupied": plan(conn, statements.MINUTES_WITH_TRADES, statements.pairs_params(symbols, minutes)),
        }
        assert conn.execute(statements.PROBE_TRADES, statements.probe_params(meta)).fetchone() == (False,)
        stored = conn.execute(statements.STORED_CANDLES, statements.pairs_params(symbols, minutes)).fetchall()
        occupied = conn.execute(statements.MINUTES_WITH_TRADES, statements.pairs_params(symbols, minutes)).fetchall()
    # what the statements say is what is stored (trade g sits at NOW - 2g minutes, pair g % 200)
    expected = {(f"P{g % 200}/USD", int((NOW - timedelta(minutes=2 * g)).timestamp()) // 60)
                for g in range(1, 500_001)} & set(zip(symbols, minutes))
    assert {(row[0], row[1]) for row in stored} == expected == {(row[0], row[1]) for row in occupied}
    for name in ("probe", "candles", "occupied"):
        text = plans[name]
        assert "Hash" not in text and "Seq Scan on trades" not in text and "Seq Scan on candles" not in text, \
            f"{name}:\n{text}"
        if timescaledb:
            chunks = {line.split(" on ")[1].split()[0] for line in text.splitlines() if "_hyper_" in line and " on " in line}
            assert len(chunks) <= 2, f"{name} read {len(chunks)} chunks:\n{text}"
