"""docker-compose.yml, the Dockerfile and .env.example checked against the kit (Docker does not run here)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from defai_kit.settings import Settings, settings_example

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
ENV_EXAMPLE = (ROOT / ".env.example").read_text()
EXAMPLE_VARIABLES = dict(re.findall(r"^([A-Z_]+)=(.*)$", ENV_EXAMPLE, flags=re.M))
SERVICES = COMPOSE["services"]


WORKERS = ("core", "planner", "orchestrator")


def test_stack_has_the_five_parts_and_a_migration_step():
    assert set(SERVICES) == {"timescaledb", "nats", "api", "scheduler", "jupyter", "migrate", *WORKERS}
    assert {name for name, service in SERVICES.items() if "profiles" in service} == set(WORKERS)   # off by default
    assert SERVICES["timescaledb"]["image"].startswith("timescale/timescaledb:")
    assert "--jetstream" in SERVICES["nats"]["command"]


@pytest.mark.parametrize("name", ["timescaledb", "nats", "api", "scheduler", "jupyter"])
def test_long_running_services_have_health_checks_volumes_and_loopback_ports(name):
    service = SERVICES[name]
    assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    assert service["volumes"], name
    for port in service.get("ports", []):
        assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_named_volumes_are_declared():
    used = {v.split(":")[0] for s in SERVICES.values() for v in s.get("volumes", []) if not v.startswith(".")}
    assert used <= set(COMPOSE["volumes"])


def test_every_variable_the_stack_reads_is_in_env_example():
    text = (ROOT / "docker-compose.yml").read_text()
    wanted = set(re.findall(r"(?<!\$)\$\{([A-Z_]+)", text))
    assert wanted - set(EXAMPLE_VARIABLES) == set()


def test_every_kit_variable_the_stack_sets_is_a_real_setting():
    fields = {f"DEFAI_{name.upper()}" for name in Settings.model_fields}
    for name, service in SERVICES.items():
        environment = service.get("environment", {})
        for variable in environment:
            if variable.startswith("DEFAI_"):
                assert variable in fields, f"{name} sets unknown {variable}"


def test_stack_settings_validate():
    api = SERVICES["api"]["environment"]
    def interpolate(value: str) -> str:  # as compose does: ${X:-default} -> default, ${X:?error} -> a value
        value = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
        return re.sub(r"\$\{[A-Z_]+(:\?[^}]*)?\}", "x", value)
    values = {k: interpolate(str(v)) for k, v in api.items() if k.startswith("DEFAI_")}
    values["DEFAI_DATABASE_URL"] = "postgresql://defai:x@timescaledb:5432/defai"
    settings = Settings(_env_file=None, **{k[6:].lower(): v for k, v in values.items()})
    assert settings.live_trading is False and settings.bus_url == "nats://nats:4222"


def test_services_run_real_kit_commands():
    "Each kit service's command line parses as the real CLI would parse it: command, options and their values."
    from typer.main import get_command
    from defai_kit.cli import app
    root = get_command(app)
    for name in ("api", "migrate", "scheduler"):
        program, group, command, *arguments = SERVICES[name]["command"]
        assert program == "defai" and command in root.commands[group].commands, f"{name} runs an unknown command"
        root.commands[group].commands[command].make_context(command, list(arguments))   # raises on a wrong option
    for name in WORKERS:                     # `defai worker --role NAME`, with the settings every service gets
        program, command, *arguments = SERVICES[name]["command"]
        assert program == "defai" and arguments[:2] == ["--role", name] and arguments[2] == "--heartbeat"
        root.commands[command].make_context(command, list(arguments))
        assert SERVICES[name]["environment"] == SERVICES["scheduler"]["environment"]
        assert SERVICES[name]["volumes"] == ["kit-home:/var/lib/defai"]              # the agents' paper journals


def test_a_worker_health_check_reads_a_real_workers_heartbeat(tmp_path):
    """The workers' health check, run as Docker would (its path swapped for a temporary one), against the heartbeat of
    a real `defai worker` on a real nats-server: healthy while the worker runs, unhealthy once the file is a minute
    old (a worker cut off from NATS stops touching it) or missing."""
    from servers import NatsServer, WorkerProcess
    assert len({str(SERVICES[name]["command"][-1]) for name in WORKERS}) == 1     # one heartbeat path, one check
    check = health_check("planner", tmp_path / "alive")
    with NatsServer() as nats_server:
        environment = {**{k: v for k, v in os.environ.items() if not k.startswith("DEFAI_")},
                       "DEFAI_BUS_URL": nats_server.url, "DEFAI_HOME": str(tmp_path)}
        worker = WorkerProcess("planner", environment, tmp_path, "--heartbeat", str(tmp_path / "alive")).wait_ready()
        try:
            assert subprocess.run(check).returncode == 0
        finally:
            assert worker.stop() == 0, worker.output()
        unwritable = subprocess.run([str(Path(sys.executable).parent / "defai"), "worker", "--role", "planner",
                                     "--heartbeat", str(tmp_path / "missing" / "alive")], env=environment,
                                    capture_output=True, text=True, timeout=60)
        assert (unwritable.returncode, unwritable.stderr.strip().splitlines()[-1]) == (
            2, f"error: heartbeat: cannot write {tmp_path / 'missing' / 'alive'}: No such file or directory")
    assert_healthy_until_stale(check, tmp_path / "alive", 61)


def test_the_workers_profile_switches_the_scheduler_to_the_workers():
    "DEFAI_AGENT_EXECUTION=workers in .env makes the scheduler publish for the workers; its settings validate."
    environment = SERVICES["scheduler"]["environment"]
    assert environment["DEFAI_AGENT_EXECUTION"] == "${DEFAI_AGENT_EXECUTION:-engine}"
    assert EXAMPLE_VARIABLES["DEFAI_AGENT_EXECUTION"] == "engine"
    settings = Settings(_env_file=None, bus_url=environment["DEFAI_BUS_URL"], agent_execution="workers")
    assert settings.agent_execution == "workers"


def health_check(service: str, alive: Path) -> list[str]:
    "The service's health check as Docker runs it, with its heartbeat file's path swapped for `alive`."
    command = SERVICES[service]["command"]
    heartbeat = command[command.index("--heartbeat") + 1]
    return [sys.executable if part == "python" else part.replace(heartbeat, str(alive))
            for part in SERVICES[service]["healthcheck"]["test"][1:]]


def assert_healthy_until_stale(check: list[str], alive: Path, seconds: float) -> None:
    "Healthy while `alive` is fresh; unhealthy once it is `seconds` old, and once it is gone."
    assert subprocess.run(check).returncode == 0
    stale = time.time() - seconds
    os.utime(alive, (stale, stale))
    assert subprocess.run(check).returncode == 1
    alive.unlink()
    assert subprocess.run(check, stderr=subprocess.DEVNULL).returncode == 1


def test_the_scheduler_health_check_reads_a_real_runners_heartbeat(tmp_path):
    """The scheduler's health check, run as Docker would (its path swapped for a temporary one), against the
    heartbeat of a real `defai agent run`: healthy while the file is fresh, unhealthy once it is 5 minutes old or
    missing (a runner that stalled or never started)."""
    assert SERVICES["scheduler"]["stop_grace_period"] == "60s"      # SIGTERM: the tick in progress may finish
    environment = {**os.environ, "DEFAI_HOME": str(tmp_path), "DEFAI_DATABASE_URL": ""}
    defai = Path(sys.executable).parent / "defai"
    for arguments in (["db", "upgrade"], ["agent", "run", "--once", "--heartbeat", str(tmp_path / "alive")]):
        ran = subprocess.run([str(defai), *arguments], env=environment, capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr
    assert_healthy_until_stale(health_check("scheduler", tmp_path / "alive"), tmp_path / "alive", 301)


def test_env_example_lists_every_setting_with_its_default():
    assert ENV_EXAMPLE.startswith(settings_example())
    for name, field in Settings.model_fields.items():
        assert f"DEFAI_{name.upper()}" in EXAMPLE_VARIABLES
    assert EXAMPLE_VARIABLES["DEFAI_LIVE_TRADING"] == "false"


def test_dockerfile_installs_the_cpu_torch_build():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "whl/cpu" in dockerfile and '".[dev]"' in dockerfile
