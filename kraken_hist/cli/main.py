"""Root command group; each command group lives in its own module and is added below."""

from __future__ import annotations

import click

from kraken_hist import __version__
from kraken_hist.core.config import settings_or_env
from kraken_hist.core.errors import KrakenHistError
from kraken_hist.cli.common import Commands, setup_logging
from kraken_hist.cli.backfill import backfill
from kraken_hist.cli.candles import candles, refresh
from kraken_hist.cli.charts import chart, coverage
from kraken_hist.cli.db import db
from kraken_hist.cli.demo import demo
from kraken_hist.cli.export import export_command
from kraken_hist.cli.gaps import gaps
from kraken_hist.cli.imports import import_command
from kraken_hist.cli.pairs import pairs
from kraken_hist.cli.stream import stream
from kraken_hist.cli.tasks import task


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
