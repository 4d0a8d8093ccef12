"""Settings: every SCENEPRINT_* variable is a setting, or an error that says which one was meant."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sceneprint.service.settings import Settings


def test_a_misspelt_setting_is_refused_with_the_one_meant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCENEPRINT_MAX_UPLOAD_BYTE", "10")
    with pytest.raises(ValidationError, match=r"SCENEPRINT_MAX_UPLOAD_BYTE is not a Sceneprint setting.*"
                                              r"SCENEPRINT_MAX_UPLOAD_BYTES"):
        Settings()


def test_the_old_concurrency_variable_names_its_replacement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCENEPRINT_LIMIT_CONCURRENCY", "64")
    with pytest.raises(ValidationError, match="SCENEPRINT_MAX_CONNECTIONS"):
        Settings()


def test_settings_come_from_the_environment_and_other_project_variables_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCENEPRINT_MAX_CONNECTIONS", "64")
    monkeypatch.setenv("SCENEPRINT_HEADER_TIMEOUT_S", "2.5")
    monkeypatch.setenv("SCENEPRINT_DEV_DATA", "/somewhere")  # the training data, not a service setting
    settings = Settings()
    assert settings.max_connections == 64 and settings.header_timeout_s == 2.5


def test_an_unknown_keyword_is_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(max_top_k=5)  # type: ignore[call-arg]


def test_an_empty_variable_means_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    # Docker Compose passes `VAR=` for a variable left empty in .env: that is "not set", not "".
    monkeypatch.setenv("SCENEPRINT_MAX_SCENES", "")
    monkeypatch.setenv("SCENEPRINT_UNKNOWN_THRESHOLD", "")
    monkeypatch.setenv("SCENEPRINT_LOG_FORMAT", "")
    settings = Settings()
    assert settings.max_scenes == 10_000 and settings.unknown_threshold is None and settings.log_format == "auto"
