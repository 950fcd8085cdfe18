"""deploy/ must agree with the code: every setting documented in the example config, and the compose
file wiring the node, PostgreSQL and Orthanc with names the node actually reads.

The Docker images are not built here (no Docker in CI); these checks catch the drift that would
otherwise surface only on a deployment: a new NodeConfig field nobody documented, a misspelt
``MAMMONODE_*`` variable silently ignored, a PACS that does not know the node's AE title.
"""

from __future__ import annotations

import configparser
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from node.config import ENVIRONMENT, Destination, NodeConfig, load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
EXAMPLE = DEPLOY / "mammonode.toml.example"
FIELDS = [f.name for f in dataclasses.fields(NodeConfig)]


def env_name(field: str) -> str:
    """The environment variable of a setting: node.config's rule (ENVIRONMENT, else the prefix)."""
    return ENVIRONMENT.get(field, f"MAMMONODE_{field.upper()}")


VALID_ENV_NAMES = {env_name(f) for f in FIELDS}


def test_example_config_loads_and_keeps_safe_defaults() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.allowed_aes, "the example must show an allow-list, not accept every calling AE"
    assert config.database_url == "", "no credentials in a file that gets copied around"
    assert all(d.host.endswith(".example") for d in config.destinations), "placeholder hosts only"
    assert config.data_dir == Path("/var/lib/mammonode")  # what the unit and the images use


@pytest.mark.parametrize("field", FIELDS)
def test_every_setting_is_in_the_example_with_a_comment_and_its_environment_name(field: str) -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    first_table = next(i for i, line in enumerate(lines) if line.startswith("["))
    if lines[first_table] == f"[[{field}]]":
        index = first_table
    else:  # a top-level key: before the first table, where TOML puts it in the root
        (index,) = [i for i, line in enumerate(lines[:first_table]) if re.match(rf"{field}\s*=", line)]
    comment = []
    for line in reversed(lines[:index]):
        if not line.startswith("#"):
            break
        comment.append(line)
    assert comment, f"{field} has no comment above it"
    assert any(env_name(field) in line for line in comment), f"{field}'s comment must name {env_name(field)}"


def test_example_names_only_real_environment_variables() -> None:
    used = set(re.findall(r"MAMMONODE_[A-Z_]+", EXAMPLE.read_text(encoding="utf-8")))
    assert used <= VALID_ENV_NAMES, used - VALID_ENV_NAMES


# -- compose.yaml -------------------------------------------------------------------------------


def _interpolate(value: Any) -> str:
    """Compose's ``${VAR:?msg}`` / ``${VAR:-default}`` with the defaults, or ``secret`` when none."""

    def one(match: re.Match[str]) -> str:
        op, arg = match.group(2), match.group(3)
        return arg if op == ":-" else "secret"

    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, str(value))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8")))


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping, so merges and lookups stay readable"
    return {k: _interpolate(v) for k, v in env.items()}


def test_compose_runs_node_postgres_and_orthanc_and_migrates_before_serving(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["orthanc"]["image"].split(":")[0] in ("orthancteam/orthanc", "jodogne/orthanc")
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["mammonode"]["command"] == ["serve"]
    assert services["mammonode"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert _env(services["migrate"]) == _env(services["mammonode"])  # migrate the database served


def test_compose_node_environment_uses_the_names_deployments_rely_on(compose: dict[str, Any]) -> None:
    env = _env(compose["services"]["mammonode"])
    names = {k for k in env if k.startswith("MAMMONODE_")}
    assert names <= VALID_ENV_NAMES, names - VALID_ENV_NAMES
    assert set(ENVIRONMENT.values()) <= names  # the table, all shown in one place
    config = load_config(None, environ=env)
    assert config.database_url.startswith("postgresql+psycopg://mammonode:")
    assert "/var/lib/mammonode" in compose["services"]["mammonode"]["volumes"][0]
    assert str(config.data_dir) == "/var/lib/mammonode"


def test_compose_orthanc_is_the_destination_and_knows_the_node(compose: dict[str, Any]) -> None:
    services = compose["services"]
    config = load_config(None, environ=_env(services["mammonode"]))
    orthanc = _env(services["orthanc"])
    (destination,) = config.destinations
    pacs_port = int(orthanc["ORTHANC__DICOM_PORT"])
    assert destination == Destination(orthanc["ORTHANC__DICOM_AET"], "orthanc", pacs_port)
    assert orthanc["ORTHANC__DICOM_ALWAYS_ALLOW_STORE"] == "false"
    modalities = json.loads(orthanc["ORTHANC__DICOM_MODALITIES"])
    assert [config.ae_title, "mammonode", config.port] in modalities.values()
    assert any(peer.ae_title == destination.ae_title for peer in config.allowed_aes)  # PACS may push
    assert all(not port.startswith(("8042", "0.0.0.0")) for port in services["orthanc"].get("ports", []))


# -- systemd unit and Dockerfiles -----------------------------------------------------------------


def test_systemd_unit_runs_serve_as_mammonode_with_hardening() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "mammonode.service", encoding="utf-8")
    service = unit["Service"]
    assert service["User"] == "mammonode"
    assert service["ExecStart"].endswith("mammonode serve --config /etc/mammonode/mammonode.toml")
    assert service["EnvironmentFile"].lstrip("-") == "/etc/mammonode/mammonode.env"
    assert service["Restart"] == "on-failure"
    assert (service["ProtectSystem"], service["ReadWritePaths"]) == ("strict", "/var/lib/mammonode")
    assert service["NoNewPrivileges"] == "yes"
    assert service["Environment"]  # configparser keeps the last Environment= line; it must exist


@pytest.mark.parametrize(
    ("dockerfile", "extra"), [("Dockerfile", ".[train]"), ("Dockerfile.gpu", ".[train,gpu]")]
)
def test_dockerfiles_install_the_package_with_its_extras_and_run_serve(dockerfile: str, extra: str) -> None:
    text = (DEPLOY / dockerfile).read_text(encoding="utf-8")
    assert f'pip install "{extra}"' in text
    for package in ("node", "inference", "training", "migrations"):  # pyproject's packages
        assert f"COPY {package} ./{package}" in text
    assert "USER mammonode" in text
    assert 'ENTRYPOINT ["mammonode"]' in text and 'CMD ["serve"]' in text
    assert (DEPLOY / f"{dockerfile}.dockerignore").is_file()


def test_cpu_image_takes_torch_from_the_cpu_wheel_index() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert text.index("download.pytorch.org/whl/cpu") < text.index('pip install ".[train]"')
