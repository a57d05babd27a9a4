"""The command line under hostile input (issue 14): every error is one line on stderr with the
exit code of its kind (usage 2, runtime 1), from one place; settings come from KRAKEN_HIST_*
however the library is entered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kraken_hist.ingest.backfill import KrakenTradesBackfill
from kraken_hist.cli import cli
from kraken_hist.cli.common import EXIT_RUNTIME, EXIT_USAGE
from kraken_hist.core.config import Settings

USAGE_ERRORS = [
    ["backfill", "BTC/USD", "--since", "99999999999999"],
    ["backfill", "BTC/USD", "--since", "²"],
    ["backfill", "BTC/USD", "--since", "2025-01-02", "--until", "2025-01-01"],
    ["candles", "BTC/USD", "-i", "999999999999"],
    ["gaps", "--since", "nope"],
    ["stream", "BTC/USD", "--flush-interval", "-1"],
    ["backfill", "BTC/USD", "--no-such-option"],
]


def one_line_error(result: Any) -> str:
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    return lines[0]


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=lambda a: " ".join(a))
def test_bad_arguments_are_one_line_usage_errors(db_url: str, args: list[str]) -> None:
    result = CliRunner().invoke(cli, args, env={"KRAKEN_HIST_DATABASE_URL": db_url}, prog_name="kraken-hist")
    line = one_line_error(result)
    assert result.exit_code == EXIT_USAGE, result.output
    assert f"kraken-hist {args[0]}" in line or "kraken-hist:" in line


def test_an_unknown_revision_is_a_one_line_runtime_error(db_url: str) -> None:
    result = CliRunner().invoke(cli, ["db", "upgrade", "--revision", "zzz"], env={"KRAKEN_HIST_DATABASE_URL": db_url})
    assert result.exit_code == EXIT_RUNTIME
    assert "zzz" in one_line_error(result)


def test_errors_of_the_real_command_go_to_stderr_alone(db_url: str) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KRAKEN_HIST_")},
           "KRAKEN_HIST_DATABASE_URL": db_url}
    done = subprocess.run([sys.executable, "-m", "kraken_hist", "gaps", "--since", "nope"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_USAGE and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "cannot read time 'nope'" in done.stderr


class _Exchange(BaseHTTPRequestHandler):
    """Answers Time with a malformed result and Trades with one id beyond a bigint."""

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/0/public/Time"):
            body: dict[str, Any] = {"error": [], "result": {"unixtime": "soon"}}
        elif self.path.startswith("/0/public/Trades"):
            since = self.path.split("since=")[1].split("&")[0] if "since=" in self.path else "0"
            rows = [["100.0", "0.5", 1738540800.5, "b", "l", "", 2**63 + 5]] if int(since) < 1738540800 * 10**9 else []
            body = {"error": [], "result": {"XXBTZUSD": rows, "last": str(1738540800500000000 if rows else since)}}
        else:
            body = {"error": ["EGeneral:Invalid arguments"]}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def exchange() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Exchange)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_bigint_overflowing_id_and_a_malformed_time_answer_end_cleanly(db_url: str, exchange: str) -> None:
    env = {"KRAKEN_HIST_DATABASE_URL": db_url, "KRAKEN_HIST_REST_URL": exchange,
           "KRAKEN_HIST_REST_MIN_INTERVAL": "0", "KRAKEN_HIST_REST_LIMITER": "process"}
    result = CliRunner().invoke(cli, ["backfill", "BTC/USD", "--since", "2025-02-01", "--no-progress"], env=env)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "0 new" in result.output


def test_a_backfill_built_without_arguments_reads_the_environment(db_url: str, monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("KRAKEN_HIST_DATABASE_URL", db_url)
    monkeypatch.setenv("KRAKEN_HIST_REST_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("KRAKEN_HIST_DATA_DIR", str(tmp_path))
    with KrakenTradesBackfill() as job:
        assert job.db_url == db_url
        assert job.client.base_url == "http://127.0.0.1:9"
        assert job.settings == Settings.from_env()
