"""`mammonode model list|register|promote`: exactly one serving model, switched only on command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from admin_helpers import audit_events, cli
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from inference.bundled import BUNDLED_MODEL_DIR
from inference.manifest import load_manifest
from node import audit
from node.admin.registry import select_model_dir
from node.config import NodeConfig
from node.db.models import ModelVersion


def _listed(output: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def _active(sessions: sessionmaker[Session]) -> list[str]:
    with sessions() as session:
        return [
            r.weights_sha256
            for r in session.scalars(select(ModelVersion).where(ModelVersion.active.is_(True)))
        ]


def test_register_checks_weights_and_is_audited_once(
    test_model: Path, sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    sha = load_manifest(test_model).weights_sha256
    first = cli(["model", "register", str(test_model)], db_url, tmp_path)
    assert first.exit_code == 0, first.output
    assert first.output.startswith("registered: mammonode-test 0.0.1")
    second = cli(["model", "register", str(test_model)], db_url, tmp_path)
    assert second.output.startswith("already registered")
    (event,) = audit_events(sessions, audit.MODEL_REGISTERED)
    assert (event.details or {})["weights_sha256"] == sha

    tampered = tmp_path / "tampered"
    shutil.copytree(test_model, tampered)
    with (tampered / "model.safetensors").open("ab") as fh:
        fh.write(b"\0")
    refused = cli(["model", "register", str(tampered)], db_url, tmp_path)
    assert refused.exit_code != 0
    assert "have SHA-256" in str(refused.exception)
    assert len(audit_events(sessions, audit.MODEL_REGISTERED)) == 1

    listed = _listed(cli(["model", "list", "--json"], db_url, tmp_path).output)
    assert [m["weights_sha256"] for m in listed if not m["bundled"]] == [sha]
    assert not any(m["active"] for m in listed if not m["bundled"])
    assert [m["active"] for m in listed if m["bundled"]] == [True]  # nothing promoted: bundled serves


def test_promote_switches_the_one_active_model_and_is_audited(
    test_model: Path,
    other_weights_model: Path,
    sessions: sessionmaker[Session],
    db_url: str,
    tmp_path: Path,
) -> None:
    sha_a = load_manifest(test_model).weights_sha256
    sha_b = load_manifest(other_weights_model).weights_sha256
    config = NodeConfig(data_dir=tmp_path, database_url=db_url)

    first = cli(["model", "promote", str(other_weights_model)], db_url, tmp_path)  # registers on the way
    assert first.exit_code == 0, first.output
    bundled = load_manifest(BUNDLED_MODEL_DIR)
    assert (
        f"serving model: {bundled.name} {bundled.version} (sha256 {bundled.weights_sha256[:12]}) "
        f"-> mammonode-test 0.0.1 (sha256 {sha_b[:12]})"
    ) in first.output
    assert _active(sessions) == [sha_b]
    with sessions() as session:
        assert select_model_dir(config, session) == other_weights_model.resolve()

    cli(["model", "register", str(test_model)], db_url, tmp_path)
    ambiguous = cli(["model", "promote", "mammonode-test:0.0.1"], db_url, tmp_path)
    assert "matches several models" in str(ambiguous.exception)
    assert _active(sessions) == [sha_b]

    second = cli(["model", "promote", sha_a[:10]], db_url, tmp_path)
    assert second.exit_code == 0, second.output
    assert f"(sha256 {sha_b[:12]}) -> mammonode-test 0.0.1 (sha256 {sha_a[:12]})" in second.output
    assert _active(sessions) == [sha_a]
    with sessions() as session:
        assert select_model_dir(config, session) == test_model.resolve()

    same = cli(["model", "promote", sha_a], db_url, tmp_path)
    assert "nothing changed" in same.output

    promoted = audit_events(sessions, audit.MODEL_PROMOTED)
    assert len(promoted) == 2
    first_details, second_details = (e.details or {} for e in promoted)
    assert first_details["new"]["weights_sha256"] == sha_b
    assert first_details["old"]["bundled_default"] is True
    assert second_details["old"]["weights_sha256"] == sha_b
    assert second_details["new"]["weights_sha256"] == sha_a

    listed = _listed(cli(["model", "list", "--json"], db_url, tmp_path).output)
    assert [m["weights_sha256"] for m in listed if m["active"]] == [sha_a]
    table = cli(["model", "list"], db_url, tmp_path).output
    (active_line,) = [line for line in table.splitlines() if line.startswith("*")]
    assert sha_a[:12] in active_line

    unknown = cli(["model", "promote", "no-such-model"], db_url, tmp_path)
    assert "no registered model matches 'no-such-model'" in str(unknown.exception)


def test_promote_bundled_goes_back_to_the_demo_model(
    test_model: Path, sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    cli(["model", "promote", str(test_model)], db_url, tmp_path)
    back = cli(["model", "promote", "bundled"], db_url, tmp_path)
    assert back.exit_code == 0, back.output
    assert _active(sessions) == [load_manifest(BUNDLED_MODEL_DIR).weights_sha256]


def test_list_stars_the_bundled_model_when_it_serves_registered(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    """The worker registers the bundled model it serves; with nothing promoted it is still starred."""
    from node.admin.registry import ensure_registered

    manifest = load_manifest(BUNDLED_MODEL_DIR)
    ensure_registered(sessions, manifest, BUNDLED_MODEL_DIR, actor="worker")
    listed = _listed(cli(["model", "list", "--json"], db_url, tmp_path).output)
    assert [(m["bundled"], m["active"]) for m in listed] == [(True, True)]
    table = cli(["model", "list"], db_url, tmp_path).output.splitlines()
    [row] = [line for line in table if "(bundled)" in line]
    assert row.startswith("*")


def test_promoting_the_bundled_model_while_it_serves_says_so(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    result = cli(["model", "promote", "bundled"], db_url, tmp_path)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("already serving ")
    assert " -> " not in result.output
    assert audit_events(sessions, audit.MODEL_PROMOTED) == []
