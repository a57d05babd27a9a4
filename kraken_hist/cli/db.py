"""``kraken-hist db``: migrate the schema and show what is stored where."""

from __future__ import annotations

import time
from datetime import timedelta

import click

from kraken_hist.storage import migrate
from kraken_hist.core.config import mask_password
from kraken_hist.storage.db import is_embedded_url, resolve_database_url
from kraken_hist.storage.embedded import embedded_pgdata, is_running, start_embedded, stop_embedded
from kraken_hist.core.errors import DatabaseUnavailableError
from kraken_hist.storage.timescale import TradeStorage
from kraken_hist.cli.common import friendly_errors, settings_from


@click.group()
def db() -> None:
    """Database schema (upgrade, status) and the embedded server (start, stop, path)."""


@db.command()
@click.option("--revision", default="head", show_default=True, help="Target Alembic revision.")
@click.option("--wait", "wait_seconds", type=float, default=0.0, show_default=True,
              help="Seconds to keep retrying while the database does not answer (a container starting).")
@click.pass_context
@friendly_errors
def upgrade(ctx: click.Context, revision: str, wait_seconds: float) -> None:
    """Apply the schema migrations (safe to run again: at head it changes nothing)."""
    settings = settings_from(ctx)
    url = resolve_database_url(None, settings)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            migrate.upgrade(url, revision)
            break
        except DatabaseUnavailableError as exc:
            if time.monotonic() >= deadline:
                raise
            click.echo(f"waiting for the database: {exc}", err=True)
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
    status = migrate.read_schema_status(url)
    flavour = "plain PostgreSQL"
    if status.timescaledb and status.up_to_date:
        age = migrate.apply_compress_after(url, settings.compress_after_days)
        flavour = f"TimescaleDB, chunks compressed after {_days(age)}" if age else "TimescaleDB, no compression"
    elif status.timescaledb:
        flavour = "TimescaleDB"
    click.echo(f"database {mask_password(url)} at revision {status.revision} ({flavour})")


@db.command()
@click.pass_context
@friendly_errors
def status(ctx: click.Context) -> None:
    """Which database, embedded or not, TimescaleDB or plain, revision and rows per table."""
    settings = settings_from(ctx)
    url = resolve_database_url(None, settings)
    embedded = settings.database_url is None and is_embedded_url(url, settings)
    if embedded:
        migrate.ensure_schema(url, auto_upgrade=True)
    info = migrate.read_schema_status(url)
    click.echo(f"database:   {mask_password(url)}")
    click.echo(f"embedded:   {'yes (' + str(settings.data_dir) + ')' if embedded else 'no'}")
    click.echo(f"flavour:    {'TimescaleDB' if info.timescaledb else 'plain PostgreSQL'}")
    state = "up to date" if info.up_to_date else "run `kraken-hist db upgrade`"
    click.echo(f"revision:   {info.revision or 'none'} (head {info.head}, {state})")
    if info.row_counts:
        click.echo("rows:")
        width = max(len(name) for name in info.row_counts)
        for name, count in info.row_counts.items():
            click.echo(f"  {name:<{width}}  {count:>12,}")
    if info.trade_storage is not None:
        click.echo(f"trades:     {_storage(info.trade_storage)}")


def _days(age: timedelta | None) -> str:
    days = age.total_seconds() / 86400 if age else 0
    return f"{days:g} day{'s' if days != 1 else ''}"


def _storage(storage: TradeStorage) -> str:
    """Bytes per trade, before and after compression."""
    if not storage.trades:
        return f"none stored ({storage.bytes_stored:,} bytes)"
    before, after = storage.per_trade_uncompressed, storage.per_trade_stored
    if storage.compress_after is None and storage.chunks == 0:  # plain PostgreSQL (no compression)
        return f"{after:.1f} bytes each (table and indexes; not compressed)"
    policy = f"chunks older than {_days(storage.compress_after)}" if storage.compress_after else "no policy"
    return (f"{before:.1f} bytes each uncompressed, {after:.1f} stored "
            f"({storage.chunks_compressed} of {storage.chunks} chunks compressed; {policy})")


def _not_in_use(settings: object) -> str:
    return " (not in use: KRAKEN_HIST_DATABASE_URL is set)" if getattr(settings, "database_url", None) else ""


@db.command()
@click.pass_context
@friendly_errors
def path(ctx: click.Context) -> None:
    """Print the embedded PostgreSQL's data folder (to remove it: `db stop`, then delete it)."""
    click.echo(str(embedded_pgdata(settings_from(ctx).data_dir)))


@db.command()
@click.pass_context
@friendly_errors
def start(ctx: click.Context) -> None:
    """Start the embedded PostgreSQL (created on first use) and print its URL."""
    settings = settings_from(ctx)
    url = start_embedded(settings.data_dir)
    migrate.ensure_schema(url, auto_upgrade=True)
    click.echo(f"embedded PostgreSQL running: {url}{_not_in_use(settings)}")


@db.command()
@click.pass_context
@friendly_errors
def stop(ctx: click.Context) -> None:
    """Stop the embedded PostgreSQL (the next command that needs it starts it again)."""
    settings = settings_from(ctx)
    pgdata = embedded_pgdata(settings.data_dir)
    if not is_running(settings.data_dir):
        click.echo(f"embedded PostgreSQL in {pgdata} is not running{_not_in_use(settings)}")
        return
    if not stop_embedded(settings.data_dir):
        raise click.ClickException(f"could not stop the embedded PostgreSQL in {pgdata}")
    click.echo(f"embedded PostgreSQL in {pgdata} stopped{_not_in_use(settings)}")
