from click.testing import CliRunner

from kraken_hist.cli import cli


def test_db_upgrade_then_status(empty_db_url, timescaledb):
    runner = CliRunner()
    env = {"KRAKEN_HIST_DATABASE_URL": empty_db_url}
    before = runner.invoke(cli, ["db", "status"], env=env)
    assert before.exit_code == 0, before.output
    assert "revision:   none" in before.output and "run `kraken-hist db upgrade`" in before.output

    upgraded = runner.invoke(cli, ["db", "upgrade"], env=env)
    assert upgraded.exit_code == 0, upgraded.output
    assert ("TimescaleDB, chunks compressed after 7 days" if timescaledb else "plain PostgreSQL") in upgraded.output

    after = runner.invoke(cli, ["db", "status"], env=env)
    assert "up to date" in after.output and "embedded:   no" in after.output
    assert "trades" in after.output and "candles_4h" in after.output
    assert "trades:     none stored" in after.output  # bytes per trade, once there are some

    again = runner.invoke(cli, ["db", "upgrade"], env={**env, "KRAKEN_HIST_COMPRESS_AFTER_DAYS": "30"})
    assert again.exit_code == 0, again.output
    assert ("chunks compressed after 30 days" if timescaledb else "plain PostgreSQL") in again.output


def test_bad_configuration_is_one_clear_line():
    result = CliRunner().invoke(cli, ["db", "status"], env={"KRAKEN_HIST_DATABASE_URL": "mysql://nope"})
    assert result.exit_code == 1
    assert "KRAKEN_HIST_DATABASE_URL must be a postgresql://" in result.output
    assert "Traceback" not in result.output


def test_unreachable_database_is_a_clear_error():
    result = CliRunner().invoke(cli, ["db", "status"], env={"KRAKEN_HIST_DATABASE_URL": "postgresql://postgres@127.0.0.1:9/x?connect_timeout=2"})
    assert result.exit_code == 1
    assert "PostgreSQL is unavailable" in result.output


def test_upgrade_waits_for_a_database_that_is_not_up_yet(empty_db_url):
    """The compose `migrate` service starts with the database: it retries, then says why it gave up."""
    import time

    down = "postgresql://postgres@127.0.0.1:9/x?connect_timeout=1"
    began = time.monotonic()
    result = CliRunner().invoke(cli, ["db", "upgrade", "--wait", "1.5"], env={"KRAKEN_HIST_DATABASE_URL": down})
    assert result.exit_code == 1 and "PostgreSQL is unavailable" in result.output
    assert "waiting for the database" in result.output and time.monotonic() - began >= 1.5
    upgraded = CliRunner().invoke(cli, ["db", "upgrade", "--wait", "30"], env={"KRAKEN_HIST_DATABASE_URL": empty_db_url})
    assert upgraded.exit_code == 0, upgraded.output
