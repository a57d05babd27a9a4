"""The zero-configuration default: no database URL → an embedded PostgreSQL, reused across processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kraken_hist.core.config import Settings
from kraken_hist.storage.db import resolve_database_url
from kraken_hist.storage.embedded import embedded_pgdata, stop_embedded

pytestmark = pytest.mark.slow


def run_cli(args, data_dir, extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_HIST_")}
    env["KRAKEN_HIST_DATA_DIR"] = str(data_dir)
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "kraken_hist", *args], env=env, capture_output=True, text=True, timeout=120)


def postmaster_pid(data_dir: Path) -> int:
    return int((embedded_pgdata(data_dir) / "postmaster.pid").read_text().splitlines()[0])


def test_a_process_with_no_url_gets_a_working_migrated_database_and_the_next_reuses_it(tmp_path):
    data_dir = tmp_path / "khdata"
    try:
        first = run_cli(["db", "status"], data_dir)
        assert first.returncode == 0, first.stderr
        assert "embedded:   yes" in first.stdout
        assert "up to date" in first.stdout and "candles_1w" in first.stdout
        # creating it is said once, on stderr, with how to stop it
        assert first.stderr.count("created the embedded PostgreSQL in") == 1
        assert "kraken-hist db stop" in first.stderr
        pid = postmaster_pid(data_dir)

        second = run_cli(["db", "status"], data_dir)
        assert second.returncode == 0, second.stderr
        assert postmaster_pid(data_dir) == pid  # the same server, reused
        assert "embedded PostgreSQL" not in second.stderr  # no warning on every command

        # its life: where it is, stop, start
        path = run_cli(["db", "path"], data_dir)
        assert path.returncode == 0 and path.stdout.strip() == str(embedded_pgdata(data_dir))
        stopped = run_cli(["db", "stop"], data_dir)
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped" in stopped.stdout and not (embedded_pgdata(data_dir) / "postmaster.pid").exists()
        again = run_cli(["db", "stop"], data_dir)
        assert again.returncode == 0 and "is not running" in again.stdout
        started = run_cli(["db", "start"], data_dir)
        assert started.returncode == 0, started.stderr
        assert "embedded PostgreSQL running: postgresql://" in started.stdout
        assert postmaster_pid(data_dir) != pid
    finally:
        stop_embedded(data_dir)


def test_a_configured_url_always_wins(tmp_path, db_url):
    data_dir = tmp_path / "never-used"
    result = run_cli(["db", "status"], data_dir, {"KRAKEN_HIST_DATABASE_URL": db_url.replace("postgresql://", "postgresql+psycopg://")})
    assert result.returncode == 0, result.stderr
    assert "embedded:   no" in result.stdout
    assert not data_dir.exists()
    assert resolve_database_url(None, Settings(database_url=db_url, data_dir=data_dir)) == db_url



def test_db_path_starts_nothing(tmp_path):
    data_dir = tmp_path / "khdata"
    path = run_cli(["db", "path"], data_dir)
    assert path.returncode == 0 and path.stdout.strip() == str(embedded_pgdata(data_dir))
    assert not data_dir.exists()
