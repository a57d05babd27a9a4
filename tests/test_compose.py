"""docker-compose.yml and the Dockerfile, checked by reading them (no Docker engine here)."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from kraken_hist.config import PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = ("migrate", "worker", "beat")
_DEFAULTED = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR:-default}`` with the given variables (defaults otherwise)."""
    env = env or {}
    return _DEFAULTED.sub(lambda m: env.get(m.group(1)) or m.group(2) or "", text)


def test_the_stack_has_every_service(services: dict[str, Any]) -> None:
    assert set(services) == {"timescaledb", "redis", "migrate", "worker", "beat", "pgadmin"}


def test_timescaledb_is_postgresql_15_on_host_port_5433_with_a_volume_and_healthcheck(
    services: dict[str, Any], compose: dict[str, Any]
) -> None:
    db = services["timescaledb"]
    assert db["image"].startswith("timescale/timescaledb:") and db["image"].endswith("pg15")
    assert db["ports"] == ["5433:5432"]
    volume = db["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])


def test_redis_has_a_healthcheck_and_persists(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:")
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_migration_runs_once_before_worker_and_beat(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["kraken-hist", "db", "upgrade"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["timescaledb"]["condition"] == "service_healthy"
    for name in ("worker", "beat"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"


def test_worker_and_beat_run_the_celery_app(services: dict[str, Any]) -> None:
    worker, beat = services["worker"]["command"], services["beat"]["command"]
    assert worker[:4] == ["celery", "-A", "celery_app", "worker"]
    assert "-B" not in worker and "--beat" not in worker  # beat runs once, in its own service
    assert beat[:4] == ["celery", "-A", "celery_app", "beat"]


def test_pgadmin_sits_behind_a_profile_on_5050(services: dict[str, Any]) -> None:
    pgadmin = services["pgadmin"]
    assert pgadmin["profiles"] == ["admin"]
    assert pgadmin["ports"] == ["5050:80"]
    assert all("profiles" not in services[name] for name in services if name != "pgadmin")


def test_python_services_are_built_from_the_repository(services: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        assert services[name]["build"] == "."
        assert services[name]["image"] == services["worker"]["image"]


def test_app_services_use_only_real_kraken_hist_variables(services: dict[str, Any]) -> None:
    """A misspelt KRAKEN_HIST_* variable would be silently ignored by Settings.from_env."""
    known = {PREFIX + f.name.upper() for f in fields(Settings)}
    for name in APP_SERVICES:
        environment = services[name]["environment"]
        configured = {key for key in environment if key.startswith(PREFIX)}
        assert configured <= known, configured - known
        assert {PREFIX + "DATABASE_URL", PREFIX + "REDIS_URL", PREFIX + "SYMBOLS"} <= configured


def test_app_environment_builds_settings_pointing_at_the_stack(services: dict[str, Any]) -> None:
    environment = {k: interpolate(str(v)) for k, v in services["worker"]["environment"].items()}
    settings = Settings.from_env(environment)
    assert settings.database_url == "postgresql://kraken:kraken@timescaledb:5432/kraken_hist"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.symbols == ("BTC/USD",)
    assert (settings.gap_fill_every, settings.refresh_every, settings.backfill_every) == (300.0, 60.0, 900.0)
    assert str(settings.data_dir) == "/data"


def test_host_variables_flow_through(services: dict[str, Any]) -> None:
    host = {"KRAKEN_HIST_SYMBOLS": "BTC/USD,ETH/USD", "KRAKEN_HIST_GAP_FILL_EVERY": "120", "POSTGRES_PASSWORD": "s3cret"}
    environment = {k: interpolate(str(v), host) for k, v in services["beat"]["environment"].items()}
    settings = Settings.from_env(environment)
    assert settings.symbols == ("BTC/USD", "ETH/USD")
    assert settings.gap_fill_every == 120.0
    assert settings.database_url == "postgresql://kraken:s3cret@timescaledb:5432/kraken_hist"


def test_database_credentials_match_the_timescaledb_service(services: dict[str, Any]) -> None:
    db_env = {k: interpolate(str(v)) for k, v in services["timescaledb"]["environment"].items()}
    url = interpolate(services["migrate"]["environment"]["KRAKEN_HIST_DATABASE_URL"])
    assert url == (
        f"postgresql://{db_env['POSTGRES_USER']}:{db_env['POSTGRES_PASSWORD']}@timescaledb:5432/{db_env['POSTGRES_DB']}"
    )


def _dockerfile() -> list[str]:
    return [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]


def test_dockerfile_installs_the_package_on_python_311_slim() -> None:
    lines = _dockerfile()
    assert lines[[l.startswith("FROM") for l in lines].index(True)] == "FROM python:3.11-slim"
    assert any(l.startswith("RUN pip install .") for l in lines)
    assert any(l.startswith("USER ") and "root" not in l for l in lines)


def test_dockerfile_copies_everything_pip_install_needs() -> None:
    """setup.cfg reads README.md, packages migrations/ and the celery_app module."""
    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    sources: list[str] = []
    for line in _dockerfile():
        if line.startswith("COPY "):
            sources.extend(line.split()[1:-1])
    for needed in ("setup.cfg", "setup.py", "pyproject.toml", "README.md", "kraken_hist", "migrations", "celery_app.py"):
        assert needed in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source
