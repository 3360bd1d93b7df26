"""docker-compose.yml and the Dockerfile, checked without a Docker engine: the three roles run the CLI's
service commands, every KVFERRY_* variable is a real setting of its role and parses, ports, addresses
and health checks agree; the base file runs anywhere (CPU), and with docker-compose.gpu.yml over it the
prefill and decode roles reserve GPUs, share the host IPC namespace (CUDA IPC) and sit on the GPUs
the host's PREFILL_GPU / DECODE_GPU name."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvferry.clients.cli import SERVICES
from kvferry.coordinator.settings import CoordinatorSettings
from kvferry.decode_service.settings import DecodeSettings
from kvferry.prefill_service.settings import PrefillSettings
from kvferry.serving.settings import env_name, parse_settings

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
        env = _interpolate({k: str(v) for k, v in svc["environment"].items()}, {})
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
        published = [f"{settings.port}:{settings.port}"]
        if name == "coordinator":  # and the OpenAI-compatible HTTP API
            published.append(f"{settings.http_port}:{settings.http_port}")
        assert [p.removeprefix("127.0.0.1:") for p in svc["ports"]] == published
        check = svc["healthcheck"]["test"]
        assert check[:4] == ["CMD", "python", "-m", "kvferry.serving.healthcheck"]
        assert check[4] == f"127.0.0.1:{settings.port}"
    coordinator = parse_settings(
        CoordinatorSettings,
        [],
        environ={k: str(v) for k, v in services["coordinator"]["environment"].items()},
    )
    assert coordinator.prefill_addresses == [f"prefill:{ports['prefill']}"]
    assert coordinator.decode_addresses == [f"decode:{ports['decode']}"]
    assert set(services["coordinator"]["depends_on"]) == {"prefill", "decode"}


def test_internal_services_are_published_on_the_host_loopback_only(services: dict[str, Any]) -> None:
    """Prefill and decode serve plaintext in this file: published beyond the host, anyone on the network
    could reserve decode's pages or read its pool's path. The coordinator is the client-facing port."""
    for name in ("prefill", "decode"):
        env = _interpolate({k: str(v) for k, v in services[name]["environment"].items()}, {})
        settings = parse_settings(SETTINGS[name], [], environ=env)
        assert settings.tls_cert is None  # plaintext, so:
        for published in services[name]["ports"]:
            assert published.startswith("127.0.0.1:"), f"{name} publishes {published} beyond the host"
    assert services["coordinator"]["ports"] == ["50051:50051", "8000:8000"]  # the client API, gRPC and HTTP


@pytest.mark.parametrize("host_token", [None, "from-the-host"])
def test_the_host_token_reaches_every_role(services: dict[str, Any], host_token: str | None) -> None:
    host_env = {} if host_token is None else {"KVFERRY_AUTH_TOKEN": host_token}
    for name, svc in services.items():
        env = _interpolate({k: str(v) for k, v in svc["environment"].items()}, host_env)
        assert parse_settings(SETTINGS[name], [], environ=env).auth_token == host_token, name


def test_base_file_runs_without_gpus_and_shares_ipc(services: dict[str, Any]) -> None:
    for name in ("prefill", "decode"):
        assert services[name]["ipc"] == "host"  # shm between CPU containers needs one IPC namespace
    assert not any("deploy" in svc for svc in services.values())  # GPUs: docker-compose.gpu.yml


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ${VAR} / ${VAR:-default} substitution, for the values this test reads."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, str):
        return re.sub(
            r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or (m.group(2) or ""), value
        )
    return value


def _merge(base: Any, override: Any) -> Any:
    """`docker compose -f base -f override`: mappings merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: _merge(base[k], v) if k in base else v for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override
        }
    return override


def gpu_services(host_env: dict[str, str]) -> dict[str, Any]:
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    override = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
    assert set(override["services"]) <= set(base["services"])  # an override adds no role
    return _interpolate(_merge(base, override), host_env)["services"]


@pytest.mark.parametrize(
    ("host_env", "devices"),
    [({}, ("cuda:0", "cuda:0")), ({"DECODE_GPU": "1"}, ("cuda:0", "cuda:1"))],
    ids=["one-gpu", "two-gpus"],
)
def test_gpu_override_reserves_gpus_shares_ipc_and_places_each_role(
    host_env: dict[str, str], devices: tuple[str, str]
) -> None:
    services = gpu_services(host_env)
    settings = {}
    for name, svc in services.items():
        env = {k: str(v) for k, v in svc["environment"].items()}
        known = {env_name(f) for f in dataclasses.fields(SETTINGS[name])}
        assert set(env) <= known, f"{name}: unknown variables {sorted(set(env) - known)}"
        settings[name] = parse_settings(SETTINGS[name], [], environ=env)
        assert svc["image"] == "kvferry:gpu" and svc["build"]["dockerfile"] == "Dockerfile.gpu"
        assert svc["build"]["args"]["CUDA_BASE"].startswith("nvidia/cuda:")  # one CUDA image
    for name in ("prefill", "decode"):
        (reservation,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert reservation["driver"] == "nvidia" and "gpu" in reservation["capabilities"]
        assert reservation.get("count") == "all"  # each role sees the other's GPU (CUDA IPC peer access)
        assert services[name]["ipc"] == "host"  # CUDA IPC handles only open in one IPC namespace
        assert settings[name].host == "0.0.0.0" and settings[name].dtype == "bfloat16"
    assert (settings["prefill"].device, settings["decode"].device) == devices
    assert settings["prefill"].transport == "auto"
    # the NCCL rendezvous store is reached by the decode service's name on the compose network
    assert settings["decode"].nccl_store_host == "decode"
    assert "deploy" not in services["coordinator"]
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["coordinator"]
    assert services["coordinator"]["environment"] == _interpolate(base["environment"], host_env)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_copies_every_package(dockerfile: str) -> None:
    text = (ROOT / dockerfile).read_text()
    copied = set(re.findall(r"^COPY (\S+) ", text, flags=re.M))
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    packages = {folder.split("/")[0] for folder in package_dirs.values()}
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"
    assert "scripts/install.sh" in text or "scripts" in copied


def test_cpu_image_takes_torch_from_the_cpu_index_and_refuses_cuda_packages() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    assert '--index-url "${TORCH_INDEX}" torch==' in text
    assert "grep -iE '^(nvidia-|cuda-|triton==)'" in text  # the build fails on any CUDA package
    assert re.search(r"^FROM \$\{CUDA_BASE\}", (ROOT / "Dockerfile.gpu").read_text(), flags=re.M)


@pytest.mark.parametrize("files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]])
def test_docker_compose_config_accepts_the_files(files: list[str]) -> None:
    """The real `docker-compose config` (no daemon needed). CI installs it (.ci/run); elsewhere the
    test is skipped when the tool is missing."""
    tool = shutil.which("docker-compose")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed; .ci/run installs Debian's package")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    args = [tool, *(a for f in files for a in ("-f", str(ROOT / f))), "config", "-q"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
