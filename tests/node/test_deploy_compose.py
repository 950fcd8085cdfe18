"""deploy/compose.yaml, checked without Docker: valid against the Compose Specification's schema,
the node configured with names the node reads, health checks where a service runs for long (the
node's is the image's /readyz), and the node, Orthanc, the demo modality and the viewer agreeing
on AE titles, hosts and ports. Secrets only come from deploy/.env.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from deploy_files import COMPOSE_SCHEMA, DEPLOY, REPO, Dockerfile, interpolate, load_compose

from node.config import ENVIRONMENT, Destination, NodeConfig, load_config

NODE_SERVICES = {"mammonode": "all", "receiver": "receiver", "worker": "worker", "sender": "sender"}
"""The services that run `mammonode serve`, and the role each runs."""
VALID_ENV_NAMES = {
    ENVIRONMENT.get(name, f"MAMMONODE_{name.upper()}") for name in NodeConfig.__dataclass_fields__
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return dict(interpolate(compose["services"]))


def _node_config(service: dict[str, Any]) -> NodeConfig:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping, so merges and lookups stay readable"
    return load_config(None, environ={k: str(v) for k, v in env.items()})


def _published(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> ``host_ip:host_port`` (``0.0.0.0`` when no address is given)."""
    out = {}
    for mapping in service.get("ports", []):
        *host, container = str(mapping).split(":")
        address = host[0] if len(host) == 2 else "0.0.0.0"
        out[int(container)] = f"{address}:{host[-1]}"
    return out


# -- the schema ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    if not COMPOSE_SCHEMA.is_file():
        pytest.fail(f"{COMPOSE_SCHEMA.relative_to(REPO)} is missing: run .ci/setup (it fetches it from npm)")
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    assert schema["title"] == "Compose Specification" and "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator: jsonschema.protocols.Validator, document: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_is_valid_against_the_compose_specification(
    compose: dict[str, Any], validator: jsonschema.protocols.Validator
) -> None:
    """As written, and interpolated as Compose validates it (the .env values standing in)."""
    assert _errors(validator, compose) == []
    assert _errors(validator, interpolate(compose)) == []


def test_the_schema_refuses_what_compose_would(
    compose: dict[str, Any], validator: jsonschema.protocols.Validator
) -> None:
    """The check above can fail: a misspelt key, a wrong type and an unknown condition are caught."""
    broken = copy.deepcopy(compose)
    broken["services"]["postgres"]["healthchek"] = broken["services"]["postgres"].pop("healthcheck")
    broken["services"]["orthanc"]["ports"] = "8042"
    broken["services"]["migrate"]["depends_on"]["postgres"]["condition"] = "service_ready"
    assert len(_errors(validator, broken)) == 3, _errors(validator, broken)


# -- the services -------------------------------------------------------------------------------------


def test_compose_runs_the_demo_and_migrates_before_any_node_serves(services: dict[str, Any]) -> None:
    assert set(services) == {"postgres", "migrate", "orthanc", "ohif", "modality", *NODE_SERVICES}
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["orthanc"]["image"].split(":")[0] == "orthancteam/orthanc"
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in NODE_SERVICES:
        service = services[name]
        assert service["image"] == "mammonode:cpu" and service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert service["command"] == ["serve"]
        assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert service["depends_on"]["orthanc"]["condition"] == "service_healthy"
        assert service["volumes"] == services["migrate"]["volumes"]  # one data folder: the spool
        assert {**service["environment"], "MAMMONODE_ROLE": "all"} == services["migrate"]["environment"]


def test_layouts_all_in_one_and_scale_out_run_every_role(services: dict[str, Any]) -> None:
    profiles = {name: services[name].get("profiles", []) for name in NODE_SERVICES}
    assert profiles == {
        "mammonode": ["all-in-one"],
        **{name: ["scale-out"] for name in ("receiver", "worker", "sender")},
    }
    for name, role in NODE_SERVICES.items():
        assert _node_config(services[name]).role == role
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert services["receiver"]["networks"]["default"]["aliases"] == ["mammonode"]  # what peers call
    assert _published(services["receiver"]) == _published(services["mammonode"])
    example = (DEPLOY / "compose.env.example").read_text(encoding="utf-8")
    assert re.search(r"^COMPOSE_PROFILES=all-in-one$", example, re.MULTILINE), "a layout by default"


def test_node_environment_uses_only_names_the_node_reads(services: dict[str, Any]) -> None:
    for name in (*NODE_SERVICES, "migrate"):
        env = services[name]["environment"]
        names = {k for k in env if k.startswith("MAMMONODE_")}
        assert names <= VALID_ENV_NAMES, names - VALID_ENV_NAMES
        assert set(ENVIRONMENT.values()) <= names  # the documented names, all shown in one place
        config = _node_config(services[name])
        assert config.database_url.startswith("postgresql+psycopg://mammonode:")
        assert f"mammonode-data:{config.data_dir}" in services[name]["volumes"]


def test_long_running_services_have_health_checks_and_the_node_uses_readyz(services: dict[str, Any]) -> None:
    image_check = Dockerfile("Dockerfile").healthcheck().command
    assert "/readyz" in image_check[-1]
    for name, service in services.items():
        check = service.get("healthcheck")
        if service.get("restart") == "no":
            assert check == {"disable": True}, f"{name} is a one-shot: the image's check means nothing"
        elif service.get("image", "").startswith("mammonode:"):
            assert check is None, f"{name} keeps the image's /readyz check"
        else:
            assert check and check["test"][0] in ("CMD", "CMD-SHELL") and not check.get("disable"), name
    for name, dependency in [("ohif", "orthanc"), ("modality", "orthanc"), ("modality", "mammonode")]:
        assert services[name]["depends_on"][dependency]["condition"] == "service_healthy"


def test_node_orthanc_and_the_demo_modality_agree_on_aes_hosts_and_ports(services: dict[str, Any]) -> None:
    config = _node_config(services["mammonode"])
    orthanc = services["orthanc"]["environment"]
    (destination,) = config.destinations
    assert destination == Destination(
        orthanc["ORTHANC__DICOM_AET"], "orthanc", int(orthanc["ORTHANC__DICOM_PORT"])
    )
    assert orthanc["ORTHANC__DICOM_ALWAYS_ALLOW_STORE"] == "false"
    modalities = json.loads(orthanc["ORTHANC__DICOM_MODALITIES"]).values()
    assert [config.ae_title, "mammonode", config.port] in modalities  # Orthanc takes the results
    assert any(peer.ae_title == destination.ae_title for peer in config.allowed_aes)  # PACS may push
    assert _published(services["mammonode"])[config.port].endswith(f":{config.port}")

    words = shlex.split(services["modality"]["command"][0])
    sends = [words[i + 1 : words.index("--aet", i) + 2] for i, w in enumerate(words) if w == "send"]
    targets = {send[send.index("--to") + 1] for send in sends}
    assert targets == {f"{config.ae_title}@mammonode:{config.port}", str(destination)}
    (calling,) = {send[send.index("--aet") + 1] for send in sends}
    assert any(peer.ae_title == calling for peer in config.allowed_aes), "the node accepts the modality"
    assert [calling, "modality", 104] in modalities, "and so does Orthanc"
    assert sends[0][0] == sends[1][0] and sends[0][0].startswith(words[words.index("synth") + 1])


def test_web_and_metrics_ports_stay_on_the_docker_hosts_loopback(services: dict[str, Any]) -> None:
    config = _node_config(services["mammonode"])
    for name, service in services.items():
        for container_port, host in _published(service).items():
            if (name, container_port) not in (("mammonode", config.port), ("receiver", config.port)):
                assert host.startswith("127.0.0.1:"), f"{name}:{container_port} is published on {host}"


def test_secrets_come_only_from_the_env_file(compose: dict[str, Any]) -> None:
    text = (DEPLOY / "compose.yaml").read_text(encoding="utf-8")
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required == {"POSTGRES_PASSWORD", "ORTHANC_PASSWORD"}
    for name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            if "PASSWORD" in key:
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), f"{name}: {key} is written in the file"
    assert re.search(r"://mammonode:\$\{POSTGRES_PASSWORD:\?[^}]*\}@postgres:", text)
    example = dict(
        line.split("=", 1)
        for line in (DEPLOY / "compose.env.example").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    )
    assert required <= set(example) and all(example[name] == "" for name in required), (
        "the example leaves passwords empty, so that compose refuses to start until they are set"
    )


# -- the viewer ---------------------------------------------------------------------------------------


def test_viewer_is_the_ohif_ci_tests_serving_orthancs_dicomweb_from_one_origin(
    services: dict[str, Any],
) -> None:
    tested = re.search(
        r'^OHIF_VERSION = "([\d.]+)"$', (REPO / "tests/viewer/ohif.py").read_text(), re.MULTILINE
    )
    assert tested and services["ohif"]["image"] == f"ohif/app:v{tested.group(1)}"
    mounts = {m.split(":")[1]: DEPLOY / m.split(":")[0] for m in services["ohif"]["volumes"]}
    assert all(path.is_file() for path in mounts.values()), mounts
    assert services["ohif"]["entrypoint"][-1] in mounts
    nginx = mounts["/etc/nginx/conf.d/default.conf"].read_text(encoding="utf-8")
    listen, alias = re.findall(r"^\s*listen (\d+);", nginx, re.M), re.findall(r"alias (\S+);", nginx)
    assert _published(services["ohif"])[int(*listen)].startswith("127.0.0.1:")
    assert alias == ["/etc/ohif/app-config.js"]
    orthanc = services["orthanc"]["environment"]
    raw = load_compose()["services"]  # before interpolation: the names of the .env variables
    users = json.loads(raw["orthanc"]["environment"]["ORTHANC__REGISTERED_USERS"])
    viewer = raw["ohif"]["environment"]
    assert users[viewer["ORTHANC_USER"]] == viewer["ORTHANC_PASSWORD"], "nginx logs in as a user Orthanc has"
    root = orthanc["ORTHANC__DICOM_WEB__ROOT"]
    assert orthanc["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert f"location {root} {{" in nginx and "set $orthanc http://orthanc:8042;" in nginx
    assert 8042 in _published(services["orthanc"]), "Orthanc's HTTP port, which nginx proxies to"
    app_config = mounts["/etc/ohif/app-config.js"].read_text(encoding="utf-8")
    assert f"window.location.origin + '{root.rstrip('/')}'" in app_config


def test_paths_in_compose_exist(compose: dict[str, Any]) -> None:
    build = compose["services"]["mammonode"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY.resolve() / "Dockerfile"
    assert Path(DEPLOY / build["context"]).resolve() == REPO
