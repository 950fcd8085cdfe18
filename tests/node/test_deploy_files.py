"""deploy/ must agree with the code: every setting documented in the example config, images that
install what serving needs (the CPU one without torch) with a health check on /readyz, a systemd
unit that systemd itself accepts, and the viewer configured as CI's viewer test runs it.

No Docker engine runs here: the images are not built. What their commands do is run in a virtual
environment by test_deploy_images.py; the compose file is checked by test_deploy_compose.py.
"""

from __future__ import annotations

import base64
import configparser
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from deploy_files import DEPLOY, DOCKERFILES, REPO, Dockerfile, dockerignore_included
from packaging.requirements import Requirement

from node.config import ENVIRONMENT, NodeConfig, load_config

EXAMPLE = DEPLOY / "mammonode.toml.example"
FIELDS = [f.name for f in dataclasses.fields(NodeConfig)]


def env_name(field: str) -> str:
    """The environment variable of a setting: node.config's rule (ENVIRONMENT, else the prefix)."""
    return ENVIRONMENT.get(field, f"MAMMONODE_{field.upper()}")


VALID_ENV_NAMES = {env_name(f) for f in FIELDS}


# -- the example config ---------------------------------------------------------------------------


def test_example_config_loads_and_keeps_safe_defaults() -> None:
    config = load_config(EXAMPLE, environ={})
    assert config.allowed_aes, "the example must show an allow-list, not accept every calling AE"
    assert config.database_url == "", "no credentials in a file that gets copied around"
    assert all(d.host.endswith(".example") for d in config.destinations), "placeholder hosts only"
    assert config.data_dir == Path("/var/lib/mammonode")  # what the unit and the images use
    assert config.metrics_port and config.metrics_bind_address == "127.0.0.1"  # health, kept local


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


def test_example_shows_a_dicom_tls_destination_table_that_loads(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    start = text.index("# [[destinations]]\n# ae_title")
    table = text[start : text.index("\n\n", start)]
    toml = tmp_path / "node.toml"
    toml.write_text("\n".join(line.removeprefix("# ") for line in table.splitlines()), encoding="utf-8")
    (destination,) = load_config(toml, environ={}).destinations
    assert destination.tls is not None and destination.host.endswith(".example")


def test_example_names_only_real_environment_variables() -> None:
    used = set(re.findall(r"MAMMONODE_[A-Z_]+", EXAMPLE.read_text(encoding="utf-8")))
    assert used <= VALID_ENV_NAMES, used - VALID_ENV_NAMES


# -- the Dockerfiles ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_copy_the_package_and_their_build_context_holds_just_that(name: str) -> None:
    dockerfile = Dockerfile(name)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {source for sources, _ in dockerfile.copies() for source in sources}
    assert copied == packages | {"pyproject.toml", pyproject["project"]["readme"]}
    assert dockerignore_included(name) == copied, "the .dockerignore lets in exactly what is copied"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_images_serve_as_an_unprivileged_user_with_an_owner_only_data_folder(name: str) -> None:
    dockerfile = Dockerfile(name)
    env = dockerfile.environment()
    names = {k for k in env if k.startswith("MAMMONODE_")}
    assert names <= VALID_ENV_NAMES, names - VALID_ENV_NAMES
    assert load_config(None, environ=env).data_dir == Path("/var/lib/mammonode")
    assert dockerfile.one("USER") == "mammonode"
    assert dockerfile.all("WORKDIR")[-1] == env["MAMMONODE_DATA_DIR"]
    assert any(
        f"install -d -m 0700 -o mammonode -g mammonode {env['MAMMONODE_DATA_DIR']}" in run
        for run in dockerfile.all("RUN")
    )
    assert json.loads(dockerfile.one("VOLUME")) == [env["MAMMONODE_DATA_DIR"]]
    assert (dockerfile.exec_form("ENTRYPOINT"), dockerfile.exec_form("CMD")) == (["mammonode"], ["serve"])


@pytest.mark.parametrize("name", DOCKERFILES)
def test_health_check_asks_readyz_on_the_metrics_port_the_image_sets_and_exposes(name: str) -> None:
    dockerfile = Dockerfile(name)
    env = dockerfile.environment()
    config = load_config(None, environ=env)
    check = dockerfile.healthcheck()
    assert check.command[:2] == ["python3", "-c"], "python's urllib: the images have no curl"
    assert "/readyz" in check.command[2] and "MAMMONODE_METRICS_PORT" in check.command[2]
    assert config.metrics_port > 0 and config.metrics_bind_address in ("0.0.0.0", "127.0.0.1")
    assert set(dockerfile.one("EXPOSE").split()) == {str(config.port), str(config.metrics_port)}
    assert check.seconds("timeout") < check.seconds("interval")
    assert check.command == Dockerfile("Dockerfile").healthcheck().command, "one health check for both"


def test_cpu_image_is_the_base_install_without_torch() -> None:
    dockerfile = Dockerfile("Dockerfile")
    assert dockerfile.pip_installs() == [["."]], "the base install: no extra, no torch"
    assert dockerfile.environment()["MAMMONODE_BACKEND"] == "onnxruntime"
    assert any('python3 -c "import torch"' in run and "exit 1" in run for run in dockerfile.all("RUN"))
    text = dockerfile.path.read_text(encoding="utf-8")
    assert "Dockerfile.gpu" in text and "training machine" in text, "say where retraining runs"


def test_gpu_image_installs_train_and_the_gpu_extra_but_tensorrt_from_its_base() -> None:
    """The gpu extra's TensorRT would shadow the one of NVIDIA's base image, which is the one its
    engines must be built and run with; every other gpu package is named on the pip line."""
    dockerfile = Dockerfile("Dockerfile.gpu")
    assert dockerfile.all("FROM")[0].startswith("nvcr.io/nvidia/tensorrt:")
    torch, package = dockerfile.pip_installs()
    assert {Requirement(r).name for r in torch} == {"torch", "torchvision"}
    assert package[0] == ".[train]"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    gpu = {Requirement(r).name for r in pyproject["project"]["optional-dependencies"]["gpu"]}
    assert {Requirement(r).name for r in package[1:]} == gpu - {"tensorrt-cu12"}
    assert any("import tensorrt" in run for run in dockerfile.all("RUN")), "the build proves it is there"


# -- systemd --------------------------------------------------------------------------------------


def _unit() -> configparser.SectionProxy:
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "mammonode.service", encoding="utf-8")
    return unit["Service"]


def test_systemd_unit_runs_serve_as_mammonode_owner_only_with_hardening() -> None:
    service = _unit()
    assert service["User"] == "mammonode"
    assert service["ExecStart"].endswith("mammonode serve --config /etc/mammonode/mammonode.toml")
    assert service["EnvironmentFile"].lstrip("-") == "/etc/mammonode/mammonode.env"
    assert service["Restart"] == "on-failure"
    assert (service["ProtectSystem"], service["ReadWritePaths"]) == ("strict", "/var/lib/mammonode")
    assert (service["UMask"], service["StateDirectoryMode"]) == ("0077", "0700")
    assert service["NoNewPrivileges"] == "yes"
    assert service["Environment"]  # configparser keeps the last Environment= line; it must exist


@pytest.fixture
def unit_with_this_mammonode(tmp_path: Path) -> Path:
    """The unit with ExecStart's binary replaced by this environment's ``mammonode`` (systemd
    refuses to verify a unit whose binary does not exist)."""
    mammonode = Path(sys.executable).with_name("mammonode")
    assert mammonode.is_file(), mammonode
    unit = tmp_path / "mammonode.service"
    text = (DEPLOY / "mammonode.service").read_text(encoding="utf-8")
    unit.write_text(text.replace("/opt/mammonode/bin/mammonode", str(mammonode)), encoding="utf-8")
    return unit


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: run .ci/setup (Debian package systemd)"
    return tool


def test_systemd_accepts_the_unit_and_its_command_is_a_real_cli_command(
    unit_with_this_mammonode: Path,
) -> None:
    verify = subprocess.run(
        [_systemd_analyze(), "verify", str(unit_with_this_mammonode)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    command = _unit()["ExecStart"].split()
    command[0] = str(Path(sys.executable).with_name("mammonode"))
    help_text = subprocess.run(
        [*command[:2], "--help"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    for option in command[2:]:
        if option.startswith("--"):
            assert option in help_text, f"`mammonode {command[1]}` has no {option}"


def test_systemd_rates_the_unit_exposure_at_most_2_8(unit_with_this_mammonode: Path) -> None:
    """``systemd-analyze security`` scores the sandboxing (0 best, 10 worst); this unit reached
    2.8, and the threshold keeps a removed protection from passing unnoticed."""
    security = subprocess.run(
        [_systemd_analyze(), "security", "--offline=true", "--threshold=28", str(unit_with_this_mammonode)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert security.returncode == 0, security.stdout[-3000:] + security.stderr


# -- the viewer of the compose demo ---------------------------------------------------------------


def _window_config(script: str) -> dict[str, Any]:
    match = re.search(r"^window\.config = (\{.*?\n\});$", script, re.MULTILINE | re.DOTALL)
    assert match, "app-config.js must set window.config to a JSON object"
    return dict(json.loads(match.group(1)))


def test_viewer_config_is_the_one_the_viewer_test_runs_ohif_with(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("viewer_ohif", REPO / "tests" / "viewer" / "ohif.py")
    assert spec is not None and spec.loader is not None
    viewer = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, viewer)  # its dataclasses look their module up
    spec.loader.exec_module(viewer)
    tested, deployed = viewer.app_config_js(), (DEPLOY / "ohif" / "app-config.js").read_text(encoding="utf-8")
    expected, actual = _window_config(tested), _window_config(deployed)
    for config in (expected, actual):
        config["dataSources"][0]["configuration"].pop("friendlyName")
    assert actual == expected
    assert (
        tested[tested.index("window.config.dataSources") :]
        == deployed[deployed.index("window.config.dataSources") :]
    )


def test_viewer_start_script_writes_orthancs_credentials_for_nginx(tmp_path: Path) -> None:
    auth = tmp_path / "orthanc-auth.conf"
    env = {
        "PATH": os.defpath,
        "ORTHANC_USER": "admin",
        "ORTHANC_PASSWORD": 'p@ss "word',
        "OHIF_ORTHANC_AUTH_FILE": str(auth),
    }
    done = subprocess.run(
        ["sh", str(DEPLOY / "ohif" / "start.sh"), "echo", "nginx runs"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout == "nginx runs\n"
    token = base64.b64encode(b'admin:p@ss "word').decode()
    assert auth.read_text() == f'proxy_set_header Authorization "Basic {token}";\n'
    assert auth.stat().st_mode & 0o777 == 0o600
    default = re.search(r"OHIF_ORTHANC_AUTH_FILE:-([^}]+)\}", (DEPLOY / "ohif" / "start.sh").read_text())
    assert default, "start.sh names the file it writes by default"
    nginx = (DEPLOY / "ohif" / "nginx.conf").read_text(encoding="utf-8")
    assert f"include {default.group(1)};" in nginx, "nginx reads the file start.sh writes"
    del env["ORTHANC_PASSWORD"]
    refused = subprocess.run(
        ["sh", str(DEPLOY / "ohif" / "start.sh"), "echo", "nginx runs"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert refused.returncode != 0 and "ORTHANC_PASSWORD" in refused.stderr and not refused.stdout
