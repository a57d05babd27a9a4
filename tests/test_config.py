from pathlib import Path

import pytest

from kraken_hist.core.config import DEFAULT_REST_URL, DEFAULT_WS_URL, Settings, mask_password
from kraken_hist.core.errors import ConfigurationError


def test_defaults_point_at_the_real_exchange_and_the_embedded_database():
    settings = Settings.from_env({})
    assert settings.database_url is None
    assert settings.rest_url == DEFAULT_REST_URL == "https://api.kraken.com"
    assert settings.ws_url == DEFAULT_WS_URL == "wss://ws.kraken.com/v2"
    assert settings.symbols == ("BTC/USD",)
    assert settings.rest_min_interval == 1.0
    assert settings.data_dir.name == "kraken_hist"


def test_every_variable_is_read():
    settings = Settings.from_env(
        {
            "KRAKEN_HIST_DATABASE_URL": "postgresql+psycopg://u:p@db:5433/k",
            "KRAKEN_HIST_REDIS_URL": "redis://cache:6379/1",
            "KRAKEN_HIST_REST_URL": "http://127.0.0.1:8080",
            "KRAKEN_HIST_WS_URL": "ws://127.0.0.1:8081/v2",
            "KRAKEN_HIST_SYMBOLS": "xbtusd, ETH/USD,XDGUSD",
            "KRAKEN_HIST_DATA_DIR": "/tmp/kh",
            "KRAKEN_HIST_REST_MIN_INTERVAL": "0.5",
            "KRAKEN_HIST_GAP_FILL_EVERY": "120",
        }
    )
    assert settings.database_url == "postgresql+psycopg://u:p@db:5433/k"
    assert settings.redis_url == "redis://cache:6379/1"
    assert settings.rest_url == "http://127.0.0.1:8080"
    assert settings.ws_url == "ws://127.0.0.1:8081/v2"
    # names as given (a pattern or 'all' too): resolved through the pair table where used
    assert settings.symbols == ("xbtusd", "ETH/USD", "XDGUSD")
    assert settings.data_dir == Path("/tmp/kh")
    assert settings.rest_min_interval == 0.5
    assert settings.gap_fill_every == 120.0


def test_compression_age_in_days():
    assert Settings().compress_after_days == 7.0
    assert Settings.from_env({"KRAKEN_HIST_COMPRESS_AFTER_DAYS": "30"}).compress_after_days == 30.0
    assert Settings.from_env({"KRAKEN_HIST_COMPRESS_AFTER_DAYS": "0"}).compress_after_days == 0.0  # never


def test_empty_variables_keep_defaults():
    assert Settings.from_env({"KRAKEN_HIST_DATABASE_URL": "  "}).database_url is None


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("KRAKEN_HIST_DATABASE_URL", "mysql://x", "KRAKEN_HIST_DATABASE_URL must be a postgresql://"),
        ("KRAKEN_HIST_REST_MIN_INTERVAL", "fast", "must be a number of seconds"),
        ("KRAKEN_HIST_REST_MIN_INTERVAL", "-1", "must not be negative"),
        ("KRAKEN_HIST_SYMBOLS", " , ", "KRAKEN_HIST_SYMBOLS names no symbol"),
        ("KRAKEN_HIST_REDIS_URL", "localhost:6379", "KRAKEN_HIST_REDIS_URL must be a redis://"),
        ("KRAKEN_HIST_COMPRESS_AFTER_DAYS", "soon", "KRAKEN_HIST_COMPRESS_AFTER_DAYS must be a number of days"),
        ("KRAKEN_HIST_COMPRESS_AFTER_DAYS", "-1", "between 0 \\(never\\) and 36500 days"),
    ],
)
def test_bad_values_name_the_variable(variable, value, message):
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env({variable: value})


def test_settings_are_frozen():
    settings = Settings.from_env({})
    with pytest.raises(AttributeError):
        settings.rest_url = "x"  # type: ignore[misc]


def test_passwords_are_masked():
    assert mask_password("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert mask_password("postgresql://u@h/db") == "postgresql://u@h/db"
    described = Settings(database_url="postgresql://u:secret@h/db").describe()
    assert "secret" not in described["database_url"]
