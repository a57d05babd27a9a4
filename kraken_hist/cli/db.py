"""``kraken-hist db``: migrate the schema and show what is stored where."""

from __future__ import annotations

import click

from .. import migrate
from ..config import mask_password
from ..db import is_embedded_url, resolve_database_url
from .common import friendly_errors, settings_from


@click.group()
def db() -> None:
    """Database schema: upgrade and status."""


@db.command()
@click.option("--revision", default="head", show_default=True, help="Target Alembic revision.")
@click.pass_context
@friendly_errors
def upgrade(ctx: click.Context, revision: str) -> None:
    """Apply the schema migrations (safe to run again: at head it changes nothing)."""
    settings = settings_from(ctx)
    url = resolve_database_url(None, settings)
    migrate.upgrade(url, revision)
    status = migrate.read_schema_status(url)
    click.echo(f"database {mask_password(url)} at revision {status.revision} "
               f"({'TimescaleDB' if status.timescaledb else 'plain PostgreSQL'})")


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
