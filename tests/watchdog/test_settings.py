"""Settings: defaults that run a watchdog alone, GRADWATCH_* variables over them, flags over those."""

import pytest
from pydantic import ValidationError

from gradwatch.watchdog.settings import Settings


def test_defaults_are_a_loopback_watchdog_with_a_local_store():
    s = Settings()
    assert (s.host, s.port, s.db, s.config, s.prometheus_url) == ("127.0.0.1", 9400, "gradwatch.db", None, None)
    assert s.scrape_interval == 2.0 and s.source_timeout == 2.0
    assert s.public_url() == "http://127.0.0.1:9400"


def test_environment_overrides_defaults_and_arguments_override_the_environment(monkeypatch):
    monkeypatch.setenv("GRADWATCH_PORT", "9500")
    monkeypatch.setenv("GRADWATCH_SCRAPE_INTERVAL", "500ms")
    monkeypatch.setenv("GRADWATCH_LOG_LEVEL", "DEBUG")
    assert (Settings().port, Settings().scrape_interval, Settings().log_level) == (9500, 0.5, "debug")
    assert Settings(port=9600).port == 9600  # what `serve --port 9600` passes


@pytest.mark.parametrize(("given", "seconds"), [(2, 2.0), ("2", 2.0), ("1.5", 1.5), ("500ms", 0.5), ("1m", 60.0)])
def test_durations_take_seconds_or_prometheus_strings(given, seconds):
    assert Settings(scrape_interval=given).scrape_interval == seconds


def test_bad_values_name_the_setting():
    with pytest.raises(ValidationError) as info:
        Settings(scrape_interval="often", port=70000)
    assert {e["loc"][0] for e in info.value.errors()} == {"scrape_interval", "port"}


def test_prometheus_credentials_are_checked():
    with pytest.raises(ValidationError, match="go together"):
        Settings(prometheus_url="http://prom:9090", prometheus_username="u")
    with pytest.raises(ValidationError, match="not both"):
        Settings(prometheus_url="http://prom:9090", prometheus_bearer_token="t", prometheus_username="u", prometheus_password="p")


def test_external_url_wins_for_links():
    assert Settings(external_url="https://watchdog.example.org/").public_url() == "https://watchdog.example.org"
    assert Settings(host="::1").public_url(port=1234) == "http://[::1]:1234"
