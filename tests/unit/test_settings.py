"""Unit tests of models.settings.load_settings and the CLI's handling of its errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.errors import SettingsError
from models.settings import LogFormat, Settings, load_settings

ADPA = Path(sys.executable).with_name("adpa")


@pytest.fixture(autouse=True)
def _no_configuration(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ADPA_ variable of the environment, and no .env file, reach a test."""
    for name in list(os.environ):
        if name.startswith("ADPA_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


# -- the embedded default ---------------------------------------------------


def test_defaults_need_no_configuration() -> None:
    """With nothing configured, settings load with the documented defaults."""
    settings = load_settings()

    assert settings.data_dir == Path(".adpa")
    assert settings.lease_s == 120
    assert settings.log_format is LogFormat.AUTO
    assert settings.default_queue == "adpa.default"
    assert settings.bulk_queue == "adpa.bulk"
    assert settings.api_key is None


def test_embedded_default_keeps_everything_under_data_dir(tmp_path: Path) -> None:
    """The default uses SQLite, the filesystem broker and documents in data_dir."""
    settings = load_settings(data_dir=tmp_path / "data")
    data_dir = (tmp_path / "data").resolve()

    assert settings.resolved_database_url == f"sqlite:///{data_dir / 'adpa.sqlite3'}"
    assert settings.resolved_broker_url == "filesystem://"
    assert settings.uses_embedded_broker
    assert settings.storage_root == data_dir / "documents"

    options = settings.celery_config()["broker_transport_options"]
    assert options["data_folder_in"] == str(data_dir / "broker")
    assert options["data_folder_out"] == str(data_dir / "broker")


def test_ensure_data_dirs_creates_the_embedded_folders(tmp_path: Path) -> None:
    """ensure_data_dirs creates the data folder and the embedded broker's folders."""
    data_dir = tmp_path / "data"

    load_settings(data_dir=data_dir).ensure_data_dirs()

    assert {p.name for p in data_dir.iterdir()} == {"broker", "broker-done"}


def test_the_data_folder_is_made_for_a_server_setup_too(tmp_path: Path) -> None:
    """Beat's schedule and the demo's log live there, whatever the database."""
    data_dir = tmp_path / "data"
    settings = load_settings(
        data_dir=data_dir,
        database_url="postgresql+psycopg://u@localhost/db",
        broker_url="redis://localhost:6379/0",
    )

    settings.ensure_data_dirs()

    assert data_dir.is_dir() and list(data_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("field", "method"),
    [("data_dir", "ensure_data_dirs"), ("storage_url", "ensure_storage_root")],
)
def test_a_folder_that_cannot_be_made_names_its_setting(
    tmp_path: Path, field: str, method: str
) -> None:
    """A path under a file cannot become a folder: the error names the variable."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    settings = load_settings(**{field: str(blocker / "sub")})

    with pytest.raises(SettingsError) as caught:
        getattr(settings, method)()

    assert str(caught.value).startswith(f"invalid setting ADPA_{field.upper()}: ")
    assert "cannot create" in str(caught.value)


def test_a_misspelt_name_in_the_env_file_is_refused(tmp_path: Path) -> None:
    """Names in .env are checked too; other programs' variables are left alone."""
    (tmp_path / ".env").write_text("OTHER_TOOL=1\nADPA_LOG_LEVL=DEBUG\n")

    with pytest.raises(SettingsError, match="ADPA_LOG_LEVL: no such setting"):
        load_settings()


def test_redis_broker_sets_the_visibility_timeout(tmp_path: Path) -> None:
    """A Redis broker URL is used as given, with the visibility timeout passed on."""
    settings = load_settings(
        data_dir=tmp_path,
        broker_url="redis://broker:6379/0",
        visibility_timeout_s=4000,
    )

    config = settings.celery_config()
    assert not settings.uses_embedded_broker
    assert config["broker_url"] == "redis://broker:6379/0"
    assert config["broker_transport_options"] == {"visibility_timeout": 4000}


def test_settings_are_immutable(tmp_path: Path) -> None:
    """A loaded Settings object cannot be changed afterwards."""
    settings = load_settings(data_dir=tmp_path)

    with pytest.raises(ValueError, match="frozen"):
        settings.lease_s = 5  # type: ignore[misc]

    assert settings.lease_s == 120


# -- where values come from -------------------------------------------------


def test_adpa_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """ADPA_ variables set the matching settings, converted to their types."""
    monkeypatch.setenv("ADPA_LEASE_S", "45")
    monkeypatch.setenv("ADPA_RENDER_TIMEOUT_S", "2.5")
    monkeypatch.setenv("ADPA_LOG_FORMAT", "json")
    monkeypatch.setenv("ADPA_DEFAULT_QUEUE", "docs.fast")
    monkeypatch.setenv("ADPA_API_KEY", "adpa_abc_secret")

    settings = load_settings()

    assert settings.lease_s == 45
    assert settings.render_timeout_s == 2.5
    assert settings.log_format is LogFormat.JSON
    assert settings.default_queue == "docs.fast"
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == "adpa_abc_secret"
    assert "adpa_abc_secret" not in repr(settings)


def test_keyword_overrides_win_over_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value passed to load_settings wins over the ADPA_ variable."""
    monkeypatch.setenv("ADPA_LEASE_S", "45")

    assert load_settings(lease_s=60).lease_s == 60


def test_dotenv_file_in_the_working_folder_is_read(tmp_path: Path) -> None:
    """A .env file in the current folder supplies ADPA_ settings."""
    (tmp_path / ".env").write_text(
        "ADPA_LEASE_S=77\nADPA_BULK_QUEUE=from.dotenv\nOTHER_TOOL=ignored\n",
        encoding="utf-8",
    )

    settings = load_settings()

    assert settings.lease_s == 77
    assert settings.bulk_queue == "from.dotenv"


def test_environment_wins_over_dotenv_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ADPA_ variable set in the environment overrides the .env file's value."""
    (tmp_path / ".env").write_text("ADPA_LEASE_S=77\n", encoding="utf-8")
    monkeypatch.setenv("ADPA_LEASE_S", "33")

    assert load_settings().lease_s == 33


def test_bad_value_in_dotenv_file_names_the_variable(tmp_path: Path) -> None:
    """A bad value read from .env raises SettingsError naming its variable."""
    (tmp_path / ".env").write_text("ADPA_MAX_ATTEMPTS=many\n", encoding="utf-8")

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert caught.value.variable == "ADPA_MAX_ATTEMPTS"
    assert str(caught.value).startswith("invalid setting ADPA_MAX_ATTEMPTS:")


# -- bad values -------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("ADPA_LEASE_S", "abc", "integer"),
        ("ADPA_LEASE_S", "1", "greater than or equal to 5"),
        ("ADPA_LOG_LEVEL", "LOUD", "pattern"),
        ("ADPA_LOG_FORMAT", "xml", "auto"),
        ("ADPA_RENDER_TIMEOUT_S", "0", "greater than 0"),
        ("ADPA_MAX_OUTPUT_BYTES", "10", "1024"),
        ("ADPA_DEFAULT_QUEUE", "bad queue", "pattern"),
        ("ADPA_DB_POOL_SIZE", "99", "less than or equal to 50"),
        ("ADPA_DATABASE_URL", "nonsense", "not a database URL"),
        ("ADPA_BROKER_URL", "nonsense://x", "unsupported broker URL scheme"),
        ("ADPA_BROKER_URL", "s3cret-host:6379", "not a URL; expected e.g. redis://"),
        ("ADPA_BROKER_URL", "redis://:pw@127.0.0.1:notaport/8", "port is not a number"),
        ("ADPA_BROKER_URL", "redis://127.0.0.1:99999/0", "port is not a number"),
        ("ADPA_LEASE_S", "99999999999999999999", "less than or equal to 86400"),
        ("ADPA_SWEEP_QUEUED_AFTER_S", "1e20", "less than or equal to 604800"),
        ("ADPA_SWEEP_UNSENT_AFTER_S", "1e20", "less than or equal to 604800"),
        ("ADPA_BROKER_URL", "redis://127.0.0.1:6379/abc", "'abc' is not a number"),
        ("ADPA_DATABASE_URL", "mysql://x/y", "unsupported database 'mysql'"),
        ("ADPA_DATABASE_URL", "postgresql+asyncpg://x/y", "unsupported database"),
        ("ADPA_STORAGE_URL", "s3://bucket/docs", "only file:// storage"),
        ("ADPA_RETRY_BACKOFF_BASE_S", "inf", "finite"),
        ("ADPA_SWEEP_INTERVAL_S", "nan", "finite"),
        ("ADPA_DATABSE_URL", "sqlite://", "did you mean ADPA_DATABASE_URL?"),
    ],
)
def test_bad_variable_raises_settings_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, words: str
) -> None:
    """A bad value, or a name that is no setting, raises SettingsError naming it."""
    monkeypatch.setenv(variable, value)

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"invalid setting {variable}: ")
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_log_level_is_read_in_any_case(tmp_path: Path) -> None:
    """ADPA_LOG_LEVEL=debug means DEBUG, as a person would expect."""
    assert load_settings(data_dir=tmp_path, log_level="debug").log_level == "DEBUG"


def test_bad_keyword_override_names_the_variable(tmp_path: Path) -> None:
    """A bad value passed as a keyword is reported under its ADPA_ name too."""
    with pytest.raises(SettingsError) as caught:
        load_settings(data_dir=tmp_path, lease_s="abc")

    assert caught.value.variable == "ADPA_LEASE_S"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        (
            {"ADPA_SWEEP_QUEUE": "adpa.default"},
            ("ADPA_DEFAULT_QUEUE", "ADPA_SWEEP_QUEUE"),
        ),
        (
            {"ADPA_RENDER_TIMEOUT_S": "60", "ADPA_TASK_SOFT_TIME_LIMIT_S": "60"},
            ("ADPA_RENDER_TIMEOUT_S", "ADPA_TASK_SOFT_TIME_LIMIT_S"),
        ),
        (
            {"ADPA_TASK_SOFT_TIME_LIMIT_S": "90", "ADPA_TASK_TIME_LIMIT_S": "90"},
            ("ADPA_TASK_SOFT_TIME_LIMIT_S", "ADPA_TASK_TIME_LIMIT_S"),
        ),
        (
            {"ADPA_VISIBILITY_TIMEOUT_S": "90", "ADPA_TASK_TIME_LIMIT_S": "90"},
            ("ADPA_VISIBILITY_TIMEOUT_S", "ADPA_TASK_TIME_LIMIT_S"),
        ),
        (
            {"ADPA_VISIBILITY_TIMEOUT_S": "300", "ADPA_RETRY_BACKOFF_MAX_S": "300"},
            ("ADPA_VISIBILITY_TIMEOUT_S", "ADPA_RETRY_BACKOFF_MAX_S"),
        ),
        (
            {
                "ADPA_VISIBILITY_TIMEOUT_S": "361",
                "ADPA_RETRY_BACKOFF_MAX_S": "300",
                "ADPA_TASK_TIME_LIMIT_S": "61",
                "ADPA_TASK_SOFT_TIME_LIMIT_S": "60",
                "ADPA_RENDER_TIMEOUT_S": "30",
            },
            ("ADPA_VISIBILITY_TIMEOUT_S", "ADPA_RETRY_BACKOFF_MAX_S"),
        ),
    ],
    ids=[
        "render-timeout-vs-soft-limit",
        "one-queue-for-two-roles",
        "soft-limit-vs-hard-limit",
        "visibility-vs-hard-limit",
        "visibility-vs-backoff-max",
        "visibility-vs-backoff-max-plus-hard-limit",
    ],
)
def test_inconsistent_limits_raise_settings_error_naming_both_variables(
    monkeypatch: pytest.MonkeyPatch, values: dict[str, str], named: tuple[str, str]
) -> None:
    """Limits that contradict each other raise SettingsError naming both variables."""
    for variable, value in values.items():
        monkeypatch.setenv(variable, value)

    with pytest.raises(SettingsError) as caught:
        load_settings()

    for variable in named:
        assert variable in str(caught.value)


def test_limits_just_inside_the_rules_are_accepted(tmp_path: Path) -> None:
    """Each limit one step inside its cross-field rule is accepted."""
    settings = load_settings(
        data_dir=tmp_path,
        render_timeout_s=59.5,
        task_soft_time_limit_s=60,
        task_time_limit_s=61,
        visibility_timeout_s=362,
        retry_backoff_max_s=300,
    )

    assert settings.visibility_timeout_s == 362


# -- storage URL ------------------------------------------------------------


def test_file_storage_url_gives_its_absolute_path(tmp_path: Path) -> None:
    """ADPA_STORAGE_URL=file:///path puts documents at that path."""
    settings = load_settings(data_dir=tmp_path, storage_url=f"file://{tmp_path}/docs")

    assert settings.storage_root == tmp_path.resolve() / "docs"


def test_plain_storage_path_is_resolved_from_the_working_folder(
    tmp_path: Path,
) -> None:
    """A plain relative storage path is taken from the current folder."""
    settings = load_settings(data_dir=tmp_path, storage_url="out/docs")

    assert settings.storage_root == tmp_path.resolve() / "out" / "docs"


def test_a_dotenv_file_that_is_not_utf8_is_one_clear_error(tmp_path: Path) -> None:
    """A .env file with bytes that are not UTF-8 is refused, naming the file."""
    (tmp_path / ".env").write_bytes(b"ADPA_LEASE_S=\xff\n")

    with pytest.raises(SettingsError) as caught:
        load_settings()

    assert str(caught.value) == "the .env file is not valid UTF-8"


# -- the CLI ----------------------------------------------------------------


def _cli_environment(**extra: str) -> dict[str, str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("ADPA_") and name not in {"COLUMNS", "LINES"}
    }
    environment.update(extra)
    return environment


def test_cli_with_a_bad_setting_exits_2_with_one_line_naming_it(
    tmp_path: Path,
) -> None:
    """`adpa` with ADPA_LEASE_S=abc exits 2 printing one stderr line naming it."""
    result = subprocess.run(
        [str(ADPA), "db", "current"],
        cwd=tmp_path,
        env=_cli_environment(ADPA_LEASE_S="abc"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("adpa: invalid setting ADPA_LEASE_S: ")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_settings_class_reads_nothing_but_its_own_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A variable without the ADPA_ prefix does not set a setting."""
    monkeypatch.setenv("LEASE_S", "abc")

    assert Settings().lease_s == 120
