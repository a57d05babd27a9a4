"""Root command group; each command group lives in its own module and is added below."""

from __future__ import annotations

import click

from .. import __version__
from ..config import settings_or_env
from ..errors import KrakenHistError
from .common import Commands, setup_logging
from .backfill import backfill
from .candles import candles, refresh
from .charts import chart, coverage
from .db import db
from .demo import demo
from .export import export_command
from .gaps import gaps
from .imports import import_command
from .pairs import pairs
from .stream import stream
from .tasks import task


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(__version__, prog_name="kraken-hist")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Keep Kraken's market history in PostgreSQL and serve it to strategies.

    Configuration comes from KRAKEN_HIST_* environment variables (see the README); with no
    KRAKEN_HIST_DATABASE_URL an embedded PostgreSQL in the user data directory is used.
    """
    setup_logging(verbose)
    try:
        ctx.obj = settings_or_env()
    except KrakenHistError as exc:
        raise click.ClickException(str(exc)) from exc


for command in (demo, db, backfill, stream, import_command, gaps, candles, refresh, export_command, chart, coverage, task,
                pairs):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="kraken-hist")
