"""Each image's commands, run in a virtual environment made the way the image is made.

No Docker engine runs here or in CI, so the images are emulated, not built. A fresh virtual
environment (the Python of the CPU image's base) gets the CPU Dockerfile's install: its COPY lines
copy the sources into a folder standing for the build WORKDIR, and its ``RUN pip install ...`` line
runs as written there, with the image's ENV (the folder's path replaced, so the line's own
``rm -rf`` deletes the copy: the install must not depend on it). torch must not be importable.
Then the image's ENTRYPOINT + CMD run with its ENV against a temporary data folder standing for the
volume; its HEALTHCHECK command, parsed from the Dockerfile, must succeed (``/readyz``); a C-ECHO
and a synthetic 4-view study (made by the environment's own ``mammonode synth``, which the compose
demo's modality runs too, and sent by dcmtk's storescu) must be answered and scored, by ONNX
Runtime; SIGTERM must stop the node with status 0, its data folder still owner-only.

What a container has and a virtual environment has not is mapped: ``/var/lib/mammonode`` (the
volume, also the user's home) to a temporary folder, ``/opt/mammonode`` to the environment, and
the DICOM and metrics ports to free loopback ports (a container has a network of its own). The
user and folder creation of the ``useradd`` line needs root and is not run.

The GPU image (``deploy/Dockerfile.gpu``): what runs without a GPU runs, in the same torch-free
environment: its Python version check, its ENTRYPOINT with ``--version`` and ``--help``, and its
ENTRYPOINT + CMD + ENV + HEALTHCHECK serving a study (without ``MAMMONODE_BACKEND=tensorrt`` it
scores with ONNX Runtime, as the CPU image). Not tested here: NVIDIA's base image, torch's CUDA
build, TensorRT and DALI on a GPU, building an engine (``mammonode export tensorrt``); the
``gpu``-marked tests run those on a GPU machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

import pytest
from deploy_files import DOCKERFILES, REPO, Dockerfile, HealthCheck
from peers import dcmtk_tool

from node.config import load_config
from node.dicom.loopback import free_port

pytestmark = pytest.mark.slow

VOLUME = "/var/lib/mammonode"
VENV_IN_IMAGE = "/opt/mammonode"


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtual environment holding what the CPU image's install line installs (0.6 GB,
    removed after the module's tests)."""
    cpu = Dockerfile("Dockerfile")
    assert cpu.python_version() == sys.version_info[:2], (
        f"the CPU image runs Python {cpu.python_version()}, this test {sys.version_info[:2]}: "
        "emulate it with the same Python"
    )
    root = tmp_path_factory.mktemp("image")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    build_dir, source = cpu.all("WORKDIR")[0], root / "src"
    for sources, destination in cpu.copies():
        for name in sources:
            into = source / destination / name if destination.endswith("/") else source / destination
            if (REPO / name).is_dir():
                shutil.copytree(REPO / name, into, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, into)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    env.update(cpu.environment())
    env.pop("PIP_NO_CACHE_DIR")  # this machine's pip cache may speed the test up; the image has none
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{os.defpath}"
    (install,) = [run for run in cpu.all("RUN") if "pip install" in run]
    done = subprocess.run(
        ["sh", "-c", install.replace(build_dir, str(source))],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert not source.exists(), "the image's install line deletes its sources: the install is not editable"
    no_torch = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, text=True
    )
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    yield venv
    shutil.rmtree(root, ignore_errors=True)


def _container_env(dockerfile: Dockerfile, venv: Path, volume: Path) -> dict[str, str]:
    """The image's ENV as the container sees it, mapped onto this machine (see the module doc)."""
    env = dockerfile.environment({"PATH": f"{venv / 'bin'}{os.pathsep}{os.defpath}", "HOME": VOLUME})
    mapped = {k: v.replace(VOLUME, str(volume)).replace(VENV_IN_IMAGE, str(venv)) for k, v in env.items()}
    mapped["LANG"] = "C.UTF-8"
    mapped["MAMMONODE_PORT"] = str(free_port())
    mapped["MAMMONODE_METRICS_PORT"] = str(free_port())
    return mapped


def _run(command: list[str], env: dict[str, str], timeout: float = 120, **kwargs: Any) -> str:
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    assert done.returncode == 0, (
        f"{command} -> {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


@contextmanager
def _container(
    command: list[str], env: dict[str, str], cwd: Path, log: IO[str]
) -> Iterator[subprocess.Popen[str]]:
    """The image's process; on the way out it gets SIGTERM, as `docker stop` sends."""
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(
    check: HealthCheck, env: dict[str, str], cwd: Path, process: subprocess.Popen[str], log: Path
) -> float:
    """Run the HEALTHCHECK command until it succeeds, within the time Docker would give it before
    calling the container unhealthy; the seconds it took."""
    start = time.monotonic()
    deadline = (
        start + check.seconds("start-period") + check.seconds("interval") * int(check.options["retries"])
    )
    while True:
        assert process.poll() is None, f"the node exited ({process.returncode}):\n{log.read_text()[-4000:]}"
        try:
            done = subprocess.run(
                check.command,
                env=env,
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=check.seconds("timeout"),
            )
            if done.returncode == 0:
                return time.monotonic() - start
            failure = done.stderr.strip().splitlines()[-1:]
        except subprocess.TimeoutExpired:
            failure = [f"no answer within {check.options['timeout']}"]
        assert time.monotonic() < deadline, (
            f"the health check never passed: {failure}\n{log.read_text()[-4000:]}"
        )
        time.sleep(1.0)


def _wait_scored(env: dict[str, str], timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = json.loads(_run(["mammonode", "studies", "--json"], env))
        if rows and rows[0]["exam_probability"] is not None:
            return dict(rows[0])
        assert time.monotonic() < deadline, f"not scored after {timeout} s: {rows}"
        time.sleep(1.0)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_entrypoint_serves_passes_its_health_check_scores_and_stops_cleanly(
    name: str, image_venv: Path, tmp_path: Path
) -> None:
    dockerfile = Dockerfile(name)
    volume = tmp_path / "volume"
    volume.mkdir(mode=0o700)  # what the image's `install -d -m 0700` makes
    env = _container_env(dockerfile, image_venv, volume)
    config = load_config(None, environ=env)
    workdir = Path(dockerfile.all("WORKDIR")[-1].replace(VOLUME, str(volume)))
    studies = tmp_path / "studies"
    _run(["mammonode", "synth", str(studies), "--patients", "1", "--size", "512x384"], env)
    images = sorted(str(p) for p in (studies / "train_images").rglob("*.dcm"))
    assert len(images) == 4

    log_path = tmp_path / "node.log"
    command = dockerfile.exec_form("ENTRYPOINT") + dockerfile.exec_form("CMD")
    with log_path.open("w") as log, _container(command, env, workdir, log) as node:
        _wait_healthy(dockerfile.healthcheck(), env, workdir, node, log_path)
        with urllib.request.urlopen(f"http://127.0.0.1:{config.metrics_port}/readyz", timeout=10) as ready:
            assert ready.status == 200
        echo, store = dcmtk_tool("echoscu"), dcmtk_tool("storescu")
        _run([echo, "-aec", config.ae_title, "127.0.0.1", str(config.port)], env)
        _run([store, "-aec", config.ae_title, "127.0.0.1", str(config.port), *images], env)
        study = _wait_scored(env)
    text = log_path.read_text()
    assert node.returncode == 0, f"SIGTERM must stop the node cleanly:\n{text[-4000:]}"
    assert "Traceback" not in text, text[-4000:]
    assert "with backend onnxruntime" in text, "the torch-free install scores with ONNX Runtime"
    assert study["images"] == 4 and study["model"].startswith("mammonode-demo")
    assert volume.stat().st_mode & 0o777 == 0o700
    assert (volume / "mammonode.sqlite").stat().st_mode & 0o777 == 0o600


def test_gpu_image_commands_that_need_no_gpu(image_venv: Path, tmp_path: Path) -> None:
    gpu = Dockerfile("Dockerfile.gpu")
    env = _container_env(gpu, image_venv, tmp_path)
    (check,) = [c.strip() for run in gpu.all("RUN") for c in run.split("&&") if "sys.version_info" in c]
    _run(["sh", "-c", check], env)  # the base image's Python passes it (here: the CPU image's)
    entrypoint = gpu.exec_form("ENTRYPOINT")
    assert _run([*entrypoint, "--version"], env).strip().endswith(version("mammonode"))
    help_text = _run([*entrypoint, "--help"], env)
    assert all(command in help_text for command in ("serve", "export", "train", "retrain"))
    assert "--max-batch" in _run([*entrypoint, "export", "tensorrt", "--help"], env)  # how engines are built
