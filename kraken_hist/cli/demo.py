"""``kraken-hist demo``: the whole system offline, against a fake exchange, in a database of its own.

The demo never touches the user's data: it runs on a database it creates for itself and drops
first — with KRAKEN_HIST_DATABASE_URL set, ``<that database>_demo`` on the same server; without,
an embedded PostgreSQL in ``<data dir>/demo`` (a different server from the default one) — and
every KRAKEN_HIST_* setting the commands read is pointed at the demo while it runs. Then it
does what a user would: imports a generated archive, backfills through REST, streams, shows
candles and gaps, and says what happened and what to run next.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import click

from kraken_hist.core.config import Settings
from kraken_hist.core.intervals import Interval
from kraken_hist.core.timeutils import floor_minute, utcnow
from kraken_hist.cli.common import settings_from

DEMO_DATABASE_SUFFIX = "_demo"


def demo_database_url(settings: Settings) -> tuple[str, str]:
    """(URL, what it is) of the demo's database: never the database `settings` use."""
    from kraken_hist.storage.db import libpq_url

    if settings.database_url:
        from urllib.parse import quote, unquote, urlsplit, urlunsplit

        parts = urlsplit(libpq_url(settings.database_url))
        user_name = unquote(parts.path.lstrip("/")) or "postgres"
        name = user_name[: 63 - len(DEMO_DATABASE_SUFFIX)] + DEMO_DATABASE_SUFFIX
        url = urlunsplit(parts._replace(path="/" + quote(name)))
        return url, f"database {name!r}, created for the demo on your configured server"
    from kraken_hist.storage.embedded import embedded_pgdata, start_embedded

    data_dir = demo_data_dir(settings)
    return start_embedded(data_dir), f"an embedded PostgreSQL of its own in {embedded_pgdata(data_dir)}"


def demo_data_dir(settings: Settings) -> Path:
    return Path(settings.data_dir).expanduser() / "demo"


def recreate_database(url: str, settings: Settings) -> None:
    """Drop (if it exists) and create the database `url` names, through the server's
    ``postgres`` database. Only ever done to the demo's own database."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from kraken_hist.storage.embedded import embedded_pgdata

    params = conninfo_to_dict(url)
    name = str(params["dbname"])
    ours = name.endswith(DEMO_DATABASE_SUFFIX) if settings.database_url else (
        str(embedded_pgdata(demo_data_dir(settings))) in url)
    if not ours:
        raise click.ClickException(f"refusing to recreate {name!r}: not the demo's database")
    admin = make_conninfo(**(params | {"dbname": "postgres"}))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Every KRAKEN_HIST_* variable pointed at the demo while it runs (restored after), so no
    code path that reads the environment can reach the user's database or Kraken."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("KRAKEN_HIST_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("KRAKEN_HIST_")]:
            del os.environ[key]
        os.environ.update(saved)


def _step(text: str) -> None:
    click.echo("")
    click.secho(f"== {text}", bold=True)


@click.command()
@click.option("--symbol", default="BTC/USD", show_default=True, help="The pair the fake exchange trades.")
@click.option("--stream-seconds", type=click.FloatRange(min=1), default=8.0, show_default=True,
              help="How long the live stream runs.")
@click.option("--hours", type=click.IntRange(min=2, max=48), default=6, show_default=True,
              help="Hours of REST backfill; the archive holds the day before them.")
@click.pass_context
def demo(ctx: click.Context, symbol: str, stream_seconds: float, hours: int) -> None:
    """Try everything offline in a minute: a fake Kraken (REST and WebSocket on one market) and
    a database of the demo's own, never yours.

    Imports a generated archive, backfills through REST, streams live trades, shows candles and
    gaps, then says what to run against the real exchange.
    """
    from kraken_hist.storage.migrate import upgrade
    from kraken_hist.testing.fake_exchange import FakeExchange
    from kraken_hist.cli.backfill import backfill
    from kraken_hist.cli.candles import candles
    from kraken_hist.cli.gaps import gaps
    from kraken_hist.cli.imports import import_command
    from kraken_hist.cli.stream import stream

    user = settings_from(ctx)
    began = time.monotonic()
    data_dir = demo_data_dir(user)
    data_dir.mkdir(parents=True, exist_ok=True)
    url, where = demo_database_url(user)
    recreate_database(url, user)
    upgrade(url)
    click.echo(f"demo database: {where}. Your own data is not touched.")

    now = utcnow()
    backfill_from = floor_minute(now) - timedelta(hours=hours)
    archive_from = backfill_from - timedelta(days=1)
    exchange = FakeExchange([symbol], days=1 + hours / 24 + 0.1, trades_per_second=3.0)
    root = ctx.find_root()
    saved_obj = root.obj
    env = {
        "KRAKEN_HIST_DATABASE_URL": url, "KRAKEN_HIST_DATA_DIR": str(data_dir),
        "KRAKEN_HIST_REST_LIMITER": "process", "KRAKEN_HIST_EGRESS_ID": "demo",
        "KRAKEN_HIST_REST_MIN_INTERVAL": "0.02", "KRAKEN_HIST_SYMBOLS": symbol,
    }
    try:
        with exchange, _environment(env | exchange.env()):
            root.obj = dataclasses.replace(
                user, database_url=url, data_dir=data_dir, rest_url=exchange.rest_url, ws_url=exchange.ws_url,
                rest_limiter="process", egress_id="demo", rest_min_interval=0.02, rest_pair_min_interval=None,
                symbols=(symbol,), metrics_port=None,
            )
            click.echo(f"fake Kraken (one market, {symbol}): REST {exchange.rest_url}, WebSocket {exchange.ws_url}")

            _step(f"1. import a generated Time and Sales archive (the day before {backfill_from:%Y-%m-%d %H:%M} UTC)")
            archive = exchange.write_time_and_sales(symbol, archive_from, backfill_from, data_dir / "archive")
            click.echo(f"$ kraken-hist import {archive}")
            ctx.invoke(import_command, paths=(archive,), no_progress=True)

            _step(f"2. backfill the last {hours} hours through REST Trades (continues at the archive's end)")
            click.echo(f"$ kraken-hist backfill {symbol}")
            ctx.invoke(backfill, symbols=(symbol,), progress=False)

            _step(f"3. stream live trades through the WebSocket for {stream_seconds:g} s")
            click.echo(f"$ kraken-hist stream {symbol} --duration {stream_seconds:g}")
            ctx.invoke(stream, symbols=(symbol,), duration=stream_seconds, flush_interval=1.0, status_interval=2.0,
                       refresh_every=60.0)  # (refreshed once, on stop)

            _step("4. hourly candles (the last 6)")
            click.echo(f"$ kraken-hist candles {symbol} -i 1h --last 6")
            ctx.invoke(candles, symbol=symbol, interval=Interval.parse("1h"), last=6)

            _step("5. look for gaps")
            click.echo(f"$ kraken-hist gaps {symbol}")
            ctx.invoke(gaps, symbols=(symbol,), progress=False)
    finally:
        root.obj = saved_obj
    seconds = time.monotonic() - began
    look = (f"KRAKEN_HIST_DATABASE_URL='{url}'" if user.database_url else f"KRAKEN_HIST_DATA_DIR={data_dir}")
    click.echo("")
    click.secho(f"== done in {seconds:.0f} s", bold=True)
    click.echo(
        "What you saw: a day of history from an archive file (whole seconds, no trade ids), the hours after it\n"
        "from REST Trades with Kraken's ids, the live stream continuing that id sequence, 1-minute candles\n"
        "built from the trades and rolled up to 1h, and a gap check proving the trade ids run on unbroken.\n"
        f"Look around in the demo database: {look} kraken-hist candles {symbol} -i 15m --last 20\n"
        "Next, on the real exchange (your own database, a few minutes of recent history):\n"
        f"  kraken-hist backfill {symbol}\n"
        "  kraken-hist import Kraken_Trading_History.zip   # the long history, from Kraken's downloadable archive"
    )
    if not user.database_url:
        click.echo(f"The demo's server keeps running like the default one: KRAKEN_HIST_DATA_DIR={data_dir} kraken-hist "
                   f"db stop stops it; rm -rf {data_dir} removes the demo.")
