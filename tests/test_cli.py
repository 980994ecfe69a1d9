"""The `defai` command as a user runs it: a real process, its exit code and what it prints."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEFAI = str(Path(sys.executable).parent / "defai")


def defai(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([DEFAI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_version(kit_env):
    import defai_kit
    result = defai("version", env=kit_env)
    assert (result.returncode, result.stdout) == (0, f"defai-kit {defai_kit.__version__}\n")


@pytest.mark.parametrize("command", [[], ["version"], ["demo"], ["db"], ["db", "upgrade"], ["db", "state"],
                                     ["settings"], ["settings", "show"], ["settings", "example"],
                                     ["api"], ["api", "serve"], ["backtest"], ["walk-forward"], ["strategies"],
                                     ["runs"], ["runs", "list"], ["runs", "show"], ["runs", "compare"]])
def test_every_command_has_help(kit_env, command):
    result = defai(*command, "--help", env=kit_env)
    assert result.returncode == 0, result.stderr
    assert f"Usage: defai {' '.join(command)}".rstrip() in " ".join(result.stdout.split())


def test_db_upgrade_on_both_backends(kit_env, database_url):
    kit_env["DEFAI_DATABASE_URL"] = database_url
    first, second = defai("db", "upgrade", env=kit_env), defai("db", "upgrade", env=kit_env)
    assert first.returncode == 0 and "applied 0001, 0002, 0003, 0004, 0005, 0006, 0007, 0008; schema at revision 0008" in first.stdout, first.stderr
    assert second.returncode == 0 and "nothing to apply" in second.stdout
    state = defai("db", "state", env=kit_env)
    assert "revision 0008, up to date" in state.stdout and "events" in state.stdout


@pytest.mark.parametrize("variable,value,message", [
    ("DEFAI_API_PORT", "99999", "error: DEFAI_API_PORT: Input should be less than or equal to 65535 (got '99999')"),
    ("DEFAI_DATABASE_URL", "mongodb://x", "error: DEFAI_DATABASE_URL: Value error, must start with sqlite:, postgresql: or postgres: (got 'mongodb://x')"),
    ("DEFAI_LIVE_TRADING", "perhaps", "error: DEFAI_LIVE_TRADING: Input should be a valid boolean, unable to interpret input (got 'perhaps')"),
])
def test_bad_setting_is_one_line_and_exit_2(kit_env, variable, value, message):
    kit_env[variable] = value
    result = defai("db", "upgrade", env=kit_env)
    assert result.returncode == 2
    assert result.stderr == message + "\n"
    assert "Traceback" not in result.stderr + result.stdout
    assert not (Path(kit_env["DEFAI_HOME"]) / "defai.db").exists()  # nothing was written


def test_bad_setting_in_dot_env_file(kit_env, tmp_path):
    (tmp_path / ".env").write_text("DEFAI_LOG_LEVEL=LOUD\n")
    result = defai("version", env=kit_env, cwd=tmp_path)  # version needs no settings
    assert result.returncode == 0
    result = defai("db", "state", env=kit_env, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: DEFAI_LOG_LEVEL: Input should be 'DEBUG', 'INFO', 'WARNING' or 'ERROR'")


def test_unreachable_database_is_one_line_non_zero(kit_env, postgres):
    kit_env["DEFAI_DATABASE_URL"] = f"postgresql://defai:topsecret@127.0.0.1:{postgres.port + 1}/defai"
    result = defai("db", "upgrade", env=kit_env)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "topsecret" not in result.stderr
    assert result.stderr.startswith("error: database unreachable at postgresql://defai:***@127.0.0.1:")


def test_settings_show_masks_the_token(kit_env):
    kit_env["DEFAI_API_TOKEN"] = "very-secret-token"
    result = defai("settings", "show", env=kit_env)
    assert result.returncode == 0
    assert "DEFAI_API_TOKEN=***" in result.stdout and "very-secret-token" not in result.stdout
    assert "DEFAI_LIVE_TRADING=False" in result.stdout


def test_usage_errors_exit_2(kit_env):
    assert defai("frobnicate", env=kit_env).returncode == 2
    assert defai("db", "upgrade", "--bogus", env=kit_env).returncode == 2


def test_demo_runs_to_the_end(kit_env):
    result = defai("demo", env=kit_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("[1/") and "Set up the store" in lines[0]
    assert "paper trading (live trading off)" in result.stdout
    assert lines[-1].startswith("demo finished in")
    assert (Path(kit_env["DEFAI_HOME"]) / "defai.db").exists()


def test_demo_on_postgresql(kit_env, postgres):
    kit_env["DEFAI_DATABASE_URL"] = postgres.create_database("demo_run")
    result = defai("demo", env=kit_env)
    assert result.returncode == 0, result.stderr
    assert "(postgresql, revision 0008, up to date)" in result.stdout
