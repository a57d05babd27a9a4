"""Database plumbing: URL forms, the embedded default, engines, and driver errors → ours.

SQLAlchemy wants ``postgresql+psycopg://``; psycopg wants ``postgresql://``. Users may give
either, so every entry point passes URLs through here.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Iterator

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kraken_hist.core.config import Settings, settings_or_env
from kraken_hist.core.errors import DatabaseUnavailableError

_SA_SCHEME = "postgresql+psycopg://"


def sqlalchemy_url(url: str) -> str:
    """Any accepted PostgreSQL URL → the SQLAlchemy psycopg 3 form."""
    for prefix in ("postgresql+psycopg://", "postgresql+psycopg2://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return _SA_SCHEME + url[len(prefix):]
    raise ValueError(f"not a PostgreSQL URL: {url!r} (expected postgresql:// or postgresql+psycopg://)")


def number_array(values: Iterable[object]) -> str:
    """An array literal of numbers' text: sent as one string, no per-element work in the driver,
    and PostgreSQL reads each number with its own scale."""
    return "{" + ",".join(map(str, values)) + "}"


def text_array(values: Iterable[str]) -> str:
    """An array literal of strings, each quoted (one string for the driver to send)."""
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


def libpq_url(url: str) -> str:
    """Any accepted PostgreSQL URL → the plain libpq form psycopg connects with."""
    return "postgresql://" + sqlalchemy_url(url)[len(_SA_SCHEME):]


def resolve_database_url(db_url: str | None = None, settings: Settings | None = None) -> str:
    """The URL to use: an explicit one, else the configured one, else the embedded server's.

    A configured URL always wins; only with none at all does the embedded server start.
    """
    if db_url:
        return libpq_url(db_url)
    settings = settings_or_env(settings)
    if settings.database_url:
        return libpq_url(settings.database_url)
    from kraken_hist.storage.embedded import start_embedded

    return start_embedded(Path(settings.data_dir))


def is_embedded_url(url: str, settings: Settings | None = None) -> bool:
    """True when `url` points at the embedded server's socket directory."""
    from kraken_hist.storage.embedded import embedded_pgdata

    settings = settings_or_env(settings)
    return str(embedded_pgdata(Path(settings.data_dir))) in url


#: Server options of every session the library opens: each statement is planned for the values
#: it runs with. psycopg prepares a statement from its fifth run, and PostgreSQL may then keep a
#: generic plan; on TimescaleDB a generic plan cannot leave chunks out when it is made and opens
#: every chunk when it starts (a 0.3 ms duplicate probe took 10 ms over ~600 chunks). Planning
#: our statements afresh costs a fraction of a millisecond on either backend.
SESSION_OPTIONS = "-c plan_cache_mode=force_custom_plan"


def session_options(extra: object = None) -> str:
    """``SESSION_OPTIONS`` followed by the caller's own ``options`` string, if any."""
    return f"{SESSION_OPTIONS} {extra}" if extra else SESSION_OPTIONS


def create_engine(url: str, *, pool_size: int = 5, max_overflow: int = 5, custom_plans: bool = True,
                  **kwargs: object) -> Engine:
    """A SQLAlchemy engine on psycopg 3; connections are checked before use (survives restarts).
    ``custom_plans=False`` leaves PostgreSQL's plan cache as it is (``SESSION_OPTIONS``)."""
    connect_args = dict(kwargs.pop("connect_args", None) or {})  # type: ignore[call-overload]
    if custom_plans:
        connect_args["options"] = session_options(connect_args.get("options"))
    return sa.create_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        connect_args=connect_args,
        **kwargs,  # type: ignore[arg-type]
    )


def connect(url: str, **kwargs: object) -> psycopg.Connection:
    """A raw psycopg connection (for COPY), with driver errors translated."""
    kwargs["options"] = session_options(kwargs.get("options"))
    with translate_errors():
        return psycopg.connect(libpq_url(url), **kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn 'the server is not there' driver errors into DatabaseUnavailableError."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.errors.AdminShutdown) as exc:
        raise DatabaseUnavailableError(f"PostgreSQL is unavailable: {exc}".strip()) from exc
    except sa.exc.OperationalError as exc:
        raise DatabaseUnavailableError(f"PostgreSQL is unavailable: {exc.orig}".strip()) from exc


def has_timescaledb(conn: sa.Connection | psycopg.Connection) -> bool:
    """True when the timescaledb extension is installed in this database."""
    query = "SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'"
    if isinstance(conn, psycopg.Connection):
        return conn.execute(query).fetchone() is not None
    return conn.execute(sa.text(query)).first() is not None
