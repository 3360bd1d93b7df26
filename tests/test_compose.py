"""docker-compose.yml and the Dockerfile, checked without a Docker engine: the three roles run the CLI's
service commands, every KVFERRY_* variable is a real setting of its role and parses, ports, addresses
and health checks agree, GPU roles reserve a GPU and share the host IPC namespace (CUDA IPC)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from clients.cli import SERVICES
from coordinator.settings import CoordinatorSettings
from decode_service.settings import DecodeSettings
from prefill_service.settings import PrefillSettings
from serving.settings import env_name, parse_settings

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {"coordinator": CoordinatorSettings, "prefill": PrefillSettings, "decode": DecodeSettings}


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def test_three_roles_run_the_cli_service_commands(services: dict[str, Any]) -> None:
    assert set(services) == {"coordinator", "prefill", "decode"}
    for name, svc in services.items():
        assert svc["command"][:2] == ["kvferry", name]
        assert name in SERVICES


def test_environment_is_real_settings_that_parse(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        cls = SETTINGS[name]
        known = {env_name(f) for f in dataclasses.fields(cls)}
        env = {k: str(v) for k, v in svc["environment"].items()}
        assert set(env) <= known, f"{name}: unknown variables {sorted(set(env) - known)}"
        settings = parse_settings(cls, [], environ=env)
        assert settings.host == "0.0.0.0"


def test_ports_addresses_and_health_checks_agree(services: dict[str, Any]) -> None:
    ports = {}
    for name, svc in services.items():
        settings = parse_settings(
            SETTINGS[name], [], environ={k: str(v) for k, v in svc["environment"].items()}
        )
        ports[name] = settings.port
        assert svc["ports"] == [f"{settings.port}:{settings.port}"]
        check = svc["healthcheck"]["test"]
        assert check[:4] == ["CMD", "python", "-m", "serving.healthcheck"]
        assert check[4] == f"127.0.0.1:{settings.port}"
    coordinator = parse_settings(
        CoordinatorSettings,
        [],
        environ={k: str(v) for k, v in services["coordinator"]["environment"].items()},
    )
    assert coordinator.prefill_addresses == [f"prefill:{ports['prefill']}"]
    assert coordinator.decode_addresses == [f"decode:{ports['decode']}"]
    assert set(services["coordinator"]["depends_on"]) == {"prefill", "decode"}


def test_gpu_roles_reserve_a_gpu_and_share_ipc(services: dict[str, Any]) -> None:
    for name in ("prefill", "decode"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert services[name]["ipc"] == "host"
    assert "deploy" not in services["coordinator"]  # the coordinator never touches a GPU


def test_dockerfile_copies_every_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) ", text, flags=re.M))
    include = re.search(r"include = \[(.*?)\]", (ROOT / "pyproject.toml").read_text()).group(1)  # type: ignore[union-attr]
    packages = {p.strip().strip('"').rstrip("*") for p in include.split(",")}
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"
    assert "scripts/install.sh" in text or "scripts" in copied
