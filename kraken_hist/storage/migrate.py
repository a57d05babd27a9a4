"""Run the Alembic migrations from a checkout or an installed wheel, without an ini file."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import alembic.util
import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from kraken_hist.storage.db import has_timescaledb, libpq_url, sqlalchemy_url, translate_errors
from kraken_hist.core.errors import ConfigurationError, PermanentError
from kraken_hist.core.intervals import INTERVAL_RELATIONS
from kraken_hist.storage.timescale import TradeStorage, read_trade_storage, set_compress_after

if TYPE_CHECKING:
    from kraken_hist.core.config import Settings


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(sqlalchemy_url(url), poolclass=sa.pool.NullPool)


def migrations_path() -> Path:
    """Folder of the migration scripts: the installed ``kraken_hist._migrations`` package,
    else ``migrations/`` beside the package in a source checkout."""
    spec = importlib.util.find_spec("kraken_hist._migrations")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    checkout = Path(__file__).resolve().parent.parent / "migrations"
    if checkout.is_dir():
        return checkout
    raise ConfigurationError("kraken_hist migrations not found: reinstall the package")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_path()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("postgresql://unused"))
    return str(script.get_current_head())


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (idempotent: at head it does nothing)."""
    with translate_errors():
        try:
            command.upgrade(alembic_config(url), revision)
        except alembic.util.CommandError as exc:  # an unknown revision, and the like
            raise PermanentError(f"cannot upgrade to revision {revision!r}: {exc}") from exc


def downgrade(url: str, revision: str) -> None:
    with translate_errors():
        command.downgrade(alembic_config(url), revision)


def current_revision(conn: sa.Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    revision: str | None
    head: str
    timescaledb: bool
    row_counts: dict[str, int]
    trade_storage: TradeStorage | None = None  # bytes per trade before/after compression

    @property
    def up_to_date(self) -> bool:
        return self.revision == self.head


def read_schema_status(url: str) -> SchemaStatus:
    """Revision, flavour and row counts of every kraken_hist relation present."""
    engine = _engine(url)
    try:
        with translate_errors(), engine.connect() as conn:
            revision = current_revision(conn)
            timescale = has_timescaledb(conn)
            counts: dict[str, int] = {}
            present = {
                row[0]
                for row in conn.execute(
                    sa.text(
                        "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname = current_schema() AND relkind IN ('r', 'v', 'm', 'p')"
                    )
                )
            }
            names = ["trades", *INTERVAL_RELATIONS.values(), "sync_status", "coverage", "candle_changes", "exchange_candles"]
            for name in names:
                if name in present:
                    counts[name] = conn.execute(sa.text(f'SELECT count(*) FROM "{name}"')).scalar_one()
            storage = None
            if "trades" in present:
                driver = conn.connection.driver_connection
                assert isinstance(driver, psycopg.Connection)
                storage = read_trade_storage(driver, counts["trades"])
    finally:
        engine.dispose()
    return SchemaStatus(revision=revision, head=head_revision(), timescaledb=timescale, row_counts=counts,
                        trade_storage=storage)


def apply_compress_after(url: str, days: float) -> timedelta | None:
    """Make `days` the age past which TimescaleDB compresses ``trades``/``candles`` chunks
    (0: never). Returns the age in force, None on plain PostgreSQL or when switched off."""
    age = timedelta(days=days) if days else None
    with translate_errors(), psycopg.connect(libpq_url(url), autocommit=True) as conn:
        if not set_compress_after(conn, age):
            return None
    return age


def ensure_schema(url: str, *, auto_upgrade: bool = False) -> None:
    """Fail with instructions (or upgrade, when asked) if the schema is not at head."""
    engine = _engine(url)
    try:
        with translate_errors(), engine.connect() as conn:
            revision = current_revision(conn)
    finally:
        engine.dispose()
    if revision == head_revision():
        return
    if auto_upgrade:
        upgrade(url)
        return
    raise ConfigurationError(
        f"the database schema is at revision {revision or 'none'}, expected {head_revision()}: "
        "run `kraken-hist db upgrade` first"
    )


def prepare_database(db_url: str | None = None, settings: "Settings | None" = None) -> str:
    """Resolve the database to use and make sure its schema is current; returns a libpq URL.

    The embedded default is migrated automatically (zero configuration); a configured
    server must be migrated on purpose (`kraken-hist db upgrade`, or the compose service).
    """
    from kraken_hist.core.config import settings_or_env
    from kraken_hist.storage.db import resolve_database_url

    settings = settings_or_env(settings)
    explicit = bool(db_url or settings.database_url)
    url = resolve_database_url(db_url, settings)
    ensure_schema(url, auto_upgrade=not explicit)
    return url
