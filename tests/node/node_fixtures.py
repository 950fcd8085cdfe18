"""Shared fixtures of the node and reliability tests: small real models, a small synthetic
screening dataset, and fresh databases (every database test runs on SQLite and on a throwaway PostgreSQL).

The bundled demo model does not ship yet, and a test must not depend on it anyway: the scores it
checks are made by models built here, saved through the product's own model I/O and loaded back
from disk by the CLI. Everything is tiny (384x288 images, a 128x64 model grid) because the whole
node suite shares two CPU cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from peers import Orthanc, write_study
from postgres_cluster import PostgresCluster, find_pg_bin, running_cluster
from sqlalchemy.orm import Session, sessionmaker

from inference.manifest import ModelManifest, load_manifest, save_manifest

MODEL_NAME = "mammonode-test"
MODEL_VERSION = "0.0.1"
IMAGE_SIZE = (384, 288)
MODEL_GRID = (128, 64)
SYNTH_SEED = 4242


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread while the node tests run, then restore the setting.

    The tests share two CPU cores with other jobs; measured there, torch's two spinning OpenMP
    threads make a 12-image scoring run 5-7x slower (about 6 s instead of under 1 s) than one.
    The node and reliability packages' conftests apply it to their tests.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _make_model(model_dir: Path, seed: int) -> Path:
    """An efficientnet_b0 with real BatchNorm statistics, saved as a model folder.

    A freshly built network's BatchNorm layers have unit running statistics and it outputs
    about 1e-20; a few forward passes in train mode on random data give them real ones, so the
    scores, CAMs and weights hash are those of an ordinary model. ``seed`` changes the weights.
    """
    import torch

    from inference.model import build_model
    from inference.model_io import save_model
    from inference.types import PreprocessConfig

    torch.manual_seed(seed)
    model = build_model("efficientnet_b0")
    model.train()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(4, 1, *MODEL_GRID, generator=generator))
    model.eval()
    manifest = ModelManifest(
        name=MODEL_NAME,
        version=MODEL_VERSION,
        architecture="efficientnet_b0",
        preprocess=PreprocessConfig(*MODEL_GRID),
        synthetic_training_data=True,
    )
    save_model(model, manifest, model_dir)
    return model_dir


@pytest.fixture(scope="session")
def test_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The main test model: trained (as far as the manifest says) on synthetic data."""
    return _make_model(tmp_path_factory.mktemp("model-a"), seed=0)


@pytest.fixture(scope="session")
def onnx_test_model(test_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``test_model`` with its ONNX export beside the weights, as a node serves in production:
    ``backend = "auto"`` picks ONNX Runtime and the node process never imports torch."""
    from training.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("model-onnx") / "model"
    export_onnx(test_model, out=out)
    return out


@pytest.fixture(scope="session")
def other_weights_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same name, version and manifest as ``test_model``; only the weights differ."""
    return _make_model(tmp_path_factory.mktemp("model-b"), seed=1)


@pytest.fixture(scope="session")
def no_notice_model(test_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``test_model``'s very weights, but a manifest that does not declare synthetic training data,
    so the outputs carry no research notice: the control for the burned-in banner."""
    model_dir = tmp_path_factory.mktemp("model-no-notice")
    manifest = load_manifest(test_model)
    shutil.copy2(test_model / manifest.weights_file, model_dir / manifest.weights_file)
    save_manifest(dataclasses.replace(manifest, synthetic_training_data=False), model_dir)
    return model_dir


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic 4-view(ish) screening exams in the RSNA layout, every transfer syntax
    ``mixed`` chooses (all but HTJ2K) across the images (``train.csv`` +
    ``train_images/<patient>/*.dcm``)."""
    from training.synth import MIXED, generate_dataset

    root = tmp_path_factory.mktemp("synth") / "rsna"
    generate_dataset(
        root, patients=3, seed=SYNTH_SEED, cancer_rate=0.34, size=IMAGE_SIZE, transfer_syntax=MIXED
    )
    return root


DATABASES = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL server for the whole session (see ``postgres_cluster.py``)."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server (initdb, pg_ctl) not installed: `.ci/setup` apt-installs postgresql")
    with running_cluster(bin_dir) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def _postgres_head(postgres: PostgresCluster) -> str:
    """A database brought to head by the migrations once; tests get copies (CREATE ... TEMPLATE)."""
    from node.db.migrate import upgrade

    postgres.create_database("mammonode_head")
    upgrade(postgres.url("mammonode_head"))
    return "mammonode_head"


@pytest.fixture(scope="session")
def _sqlite_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file brought to head by the migrations once; tests get copies of the file."""
    from node.db.migrate import upgrade

    path = tmp_path_factory.mktemp("sqlite-head") / "head.sqlite"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=DATABASES)
def db_kind(request: pytest.FixtureRequest) -> str:
    """Which database a test runs on: every test using the database runs on both."""
    return str(request.param)


@contextlib.contextmanager
def _fresh_database(request: pytest.FixtureRequest, kind: str, name: str, at_head: bool) -> Iterator[str]:
    if kind == "sqlite":
        path = request.getfixturevalue("tmp_path") / f"{name}.sqlite"
        if at_head:
            shutil.copyfile(request.getfixturevalue("_sqlite_head"), path)
        yield f"sqlite:///{path}"
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    template = request.getfixturevalue("_postgres_head") if at_head else None
    dbname = f"{name}_{uuid.uuid4().hex[:12]}"
    cluster.create_database(dbname, template=template)
    try:
        yield cluster.url(dbname)
    finally:
        cluster.drop_database(dbname)


@pytest.fixture
def db_url(db_kind: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database for one test, empty but with the schema at the migrations' head
    (SQLite file or PostgreSQL database, per ``db_kind``)."""
    with _fresh_database(request, db_kind, "node", at_head=True) as url:
        yield url


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh PostgreSQL database at head, for the tests that need PostgreSQL alone (workers on
    several machines share one; SQLite has no place in that deployment)."""
    with _fresh_database(request, "postgresql", "pg", at_head=True) as url:
        yield url


@pytest.fixture
def empty_db_url(db_kind: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database with no tables at all, for tests of the migrations themselves."""
    with _fresh_database(request, db_kind, "empty", at_head=False) as url:
        yield url


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    """A session factory on ``db_url`` (schema in place, made by the migrations)."""
    from node.db.session import make_engine, session_factory

    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


# -- real peers (tests/node/peers.py): Orthanc as the PACS, a synthetic J2K study -----------------


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    """Start Orthanc servers for this test: ``orthanc(modalities, **kwargs) -> Orthanc`` (started).

    ``modalities`` maps Orthanc names to (AE, host, port), e.g.
    ``{"mammonode": ("MAMMONODE", "127.0.0.1", node_port)}``; only those AEs may C-ECHO/C-STORE
    to it. Every server started here is killed at teardown (a test may stop/kill and start it
    again: same ports, same stored instances). Fails with Orthanc's log when it does not start.
    """
    started: list[Orthanc] = []

    def start(modalities: Mapping[str, tuple[str, str, int]] | None = None, **kwargs: Any) -> Orthanc:
        server = Orthanc(tmp_path / f"orthanc-{len(started)}", modalities, **kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.kill()  # its storage is thrown away; a clean stop would cost 3.5 s per server


J2K_STUDY_PATIENT = "PEERS-0001"


@pytest.fixture(scope="session")
def j2k_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One synthetic 4-view screening study (L-CC, L-MLO, R-CC, R-MLO), JPEG 2000 lossless,
    384x288, patient ``J2K_STUDY_PATIENT``; files are read-only by convention (session scope)."""
    from inference.uids import derive_uid

    folder = tmp_path_factory.mktemp("j2k-study")
    return write_study(folder, patient_id=J2K_STUDY_PATIENT, study_uid=derive_uid("tests", "j2k-study"))
