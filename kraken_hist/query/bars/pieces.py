"""A long range of information bars in pieces at once (see ``bars``): cut where the server's
parallel query processes even out, each later piece on a connection of its own opened like the
caller's, all in one exported snapshot, a later piece's running total from the sum of the range
before it, and a bar two neighbours share joined.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from kraken_hist.core.timeutils import floor_minute
from kraken_hist.rules.candles import vwap_from_sums
from kraken_hist.query.bars import sql as bars_sql
from kraken_hist.query.bars.sql import BarKind, Row


def _joined_vwap(weight: Decimal, volume: Decimal, decimals: int) -> Decimal | None:
    """The query's bar vwap (``sql.BAR_VWAP``) of a bar joined from two pieces."""
    return vwap_from_sums(weight, volume, decimals) if volume > 0 else None


def join_pieces(pieces: list[list[Row]], decimals: int) -> list[Row]:
    """The rows of consecutive pieces of a range. A bar two neighbours both hold (the earlier
    one's last, still forming at the cut) becomes one: its first trade from the earlier piece,
    its last from the later."""
    out: list[Row] = []
    for rows in pieces:
        if out and rows and out[-1][0] == rows[0][0]:
            a, b = out.pop(), rows[0]
            volume, weight = a[7] + b[7], a[8] + b[8]
            out.append((a[0], a[1], b[2], a[3], max(a[4], b[4]), min(a[5], b[5]), b[6], volume, weight,
                        _joined_vwap(weight, volume, decimals), a[10] + b[10], a[11], b[12], b[13]))
            rows = rows[1:]
        out.extend(rows)
    return out


def _sibling(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any] | None:
    """A connection opened with `conn`'s own parameters (password included), or None."""
    options = {o.keyword.decode(): o.val.decode() for o in conn.pgconn.info if o.val is not None}
    try:
        return psycopg.connect(make_conninfo(**options), autocommit=True)
    except psycopg.Error:
        return None


#: What summing a minute's candle for a later piece's running total costs, against computing
#: bars over that minute (measured: ~1/12).
_OFFSET_COST = 0.08


def cut_points(conn: psycopg.Connection[Any], lo: datetime, hi: datetime) -> list[datetime]:
    """Where a long range is cut: into as many pieces as the server gives one parallel query
    processes (max_parallel_workers_per_gather + 1), at whole minutes, each later piece a little
    shorter so that summing the range before it evens out: piece i starts at the fraction
    (1 - (1 - c)^i) / (1 - (1 - c)^n) of the range, c = _OFFSET_COST."""
    with conn.transaction():
        row = conn.execute("SELECT current_setting('max_parallel_workers_per_gather')::int").fetchone()
    count = 1 + max(0, row[0] if row else 0)
    keep = 1 - _OFFSET_COST
    inner = {floor_minute(lo + (hi - lo) * ((1 - keep ** i) / (1 - keep ** count))) for i in range(1, count)}
    return [lo, *sorted(c for c in inner if lo < c < hi), hi]


def read_pieces(conn: psycopg.Connection[Any], kind: BarKind, fixed: dict[str, Any], cuts: list[datetime]
                 ) -> list[Row] | None:
    """Rows of ``[cuts[0], cuts[1])`` on `conn` and of each later piece on a connection of its
    own, all at once and in one snapshot (exported by `conn`'s transaction), joined. A later
    piece's running total starts from the sum of the range before it (the first piece's cut
    minute and whole minutes up to the piece). None when the others cannot be opened or the
    server cannot export a snapshot."""
    others = [_sibling(conn) for _ in cuts[2:]]
    if None in others:
        for other in others:
            if other is not None:
                other.close()
        return None
    first = fixed | bars_sql.query_ranges(cuts[0], cuts[1], candles=True)
    later = [fixed | bars_sql.query_ranges(a, b, candles=True) | {"ot_lo": cuts[0], "ot_hi": first["f_hi"], "oc_lo": first["c_lo"],
                                                     "oc_hi": a}
             for a, b in zip(cuts[1:], cuts[2:])]
    results: list[dict[str, Any]] = [{} for _ in later]
    imported = [threading.Event() for _ in later]

    def run(other: psycopg.Connection[Any], params: dict[str, Any], result: dict[str, Any],
            done: threading.Event, snapshot: str) -> None:
        try:
            with other.transaction():
                other.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                other.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
                done.set()
                result["rows"] = bars_sql.run_query(other, bars_sql.bars_sql(kind, from_trades=False, offset=True), params)
        except BaseException as exc:  # raised again in the caller's thread
            result["error"] = exc
        finally:
            done.set()

    exported = False
    try:
        with ExitStack() as stack:
            for other in others:
                stack.enter_context(other)  # type: ignore[arg-type]
            stack.enter_context(conn.transaction())
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
            exported = True
            workers = [threading.Thread(target=run, args=(other, params, result, done, snapshot), daemon=True,
                                        name=f"bars-piece-{i + 2}")
                       for i, (other, params, result, done) in enumerate(zip(others, later, results, imported))]
            for worker in workers:
                worker.start()
            for done in imported:
                done.wait()
            try:
                rows = bars_sql.run_query(conn, bars_sql.bars_sql(kind, from_trades=False, first_cut=first["f_hi"] > cuts[0]), first)
            except BaseException:
                for other in others:
                    other.cancel_safe()  # type: ignore[union-attr]
                raise
            finally:
                for worker in workers:
                    worker.join()
    except psycopg.Error:
        if exported:
            raise
        return None  # a server that cannot export a snapshot: the range as one query
    for result in results:
        if "error" in result:
            raise result["error"]
    return join_pieces([rows, *(result["rows"] for result in results)], fixed["decimals"])
