"""``mlxrunner serve``'s access settings: the API key's sources and their precedence, the Host
check by listen address, extra hosts and origins from flags or the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.guard import GuardPolicy
from cli.main import build_parser
from cli.serve import SettingError, api_config


def config(*flags: str, env: dict[str, str] | None = None) -> tuple[str | None, GuardPolicy]:
    result = api_config(build_parser().parse_args(["serve", *flags]), env or {})
    return result.api_key, result.guard


def test_no_key_unless_one_is_set() -> None:
    assert config()[0] is None
    assert config(env={"MLXRUNNER_API_KEY": ""})[0] is None


def test_the_key_from_the_environment(tmp_path: Path) -> None:
    assert config(env={"MLXRUNNER_API_KEY": "from-env"})[0] == "from-env"


def test_the_key_from_a_file_without_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("  from-file\n")
    assert config("--api-key-file", str(path))[0] == "from-file"


def test_flags_win_over_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("from-file\n")
    env = {"MLXRUNNER_API_KEY": "from-env"}
    assert config("--api-key", "from-flag", env=env)[0] == "from-flag"
    assert config("--api-key-file", str(path), env=env)[0] == "from-file"


def test_key_flag_and_key_file_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        config("--api-key", "a", "--api-key-file", str(tmp_path / "key"))


def test_an_unusable_key_file_is_a_setting_error(tmp_path: Path) -> None:
    with pytest.raises(SettingError, match="cannot read"):
        config("--api-key-file", str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SettingError, match="holds no key"):
        config("--api-key-file", str(empty))


@pytest.mark.parametrize(
    ("host", "checked"),
    [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("::", False)],
)
def test_the_host_check_is_on_while_listening_on_loopback(host: str, checked: bool) -> None:
    assert config("--host", host)[1].check_host is checked


def test_hosts_and_origins_from_flags_or_the_environment() -> None:
    env = {"MLXRUNNER_ALLOWED_HOSTS": "box.lan", "MLXRUNNER_ORIGINS": "https://a.example, *"}
    guard = config(env=env)[1]
    assert guard.allowed_hosts == ("box.lan",)
    assert guard.allowed_origins == ("https://a.example", "*")
    guard = config("--allowed-hosts", "x.lan,y.lan", "--origins", "", env=env)[1]
    assert guard.allowed_hosts == ("x.lan", "y.lan")
    assert guard.allowed_origins == ()  # an empty flag clears the variable's list


def test_stream_interval_reaches_the_runner_and_is_checked() -> None:
    from cli.serve import runner_options

    args = build_parser().parse_args(["serve", "--stream-interval", "4"])
    assert runner_options(args)["stream_interval"] == 4
    # Default and "auto": paced by the running streams (``pipeline.chunk_tokens``).
    assert runner_options(build_parser().parse_args(["serve"]))["stream_interval"] is None
    auto = build_parser().parse_args(["serve", "--stream-interval", "auto"])
    assert runner_options(auto)["stream_interval"] is None
    for bad in ("0", "65", "fast"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--stream-interval", bad])
