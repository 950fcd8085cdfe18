"""The event metrics the SCP and the sender count (node.observability.metrics), over real sockets.

The counters are per process and other tests in the process move them too, so each test reads
them before and after and checks the difference.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from dicom_helpers import MODALITY_AE, NODE_AE, STUDY, NodeFactory, add_output, load, mammogram, scu_store
from peers import LOOPBACK, free_port, storage_scp
from pynetdicom import AE
from sqlalchemy.orm import Session, sessionmaker

from node.config import AllowedPeer, NodeConfig
from node.db.models import utcnow
from node.dicom import allowlist, spool, tls
from node.dicom.sender import deliver_due
from node.dicom.status import DimseStatus
from node.observability.metrics import EVENTS, reason_kind

PACS_AE = "PACS"


def sample(name: str, **labels: str) -> float:
    return EVENTS.get_sample_value(name, labels) or 0.0


def samples(name: str, label_sets: list[dict[str, str]]) -> list[float]:
    return [sample(name, **labels) for labels in label_sets]


def _echo_from(calling_ae: str, port: int) -> bool:
    ae = AE(calling_ae)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(LOOPBACK, port, ae_title=NODE_AE)
    if assoc.is_established:
        assoc.release()
        return True
    return False


def test_associations_are_counted_by_result_and_kind_of_refusal(node_scp: NodeFactory) -> None:
    node = node_scp(allowed_aes=(AllowedPeer(MODALITY_AE), AllowedPeer("REMOTEPACS", "192.0.2.7")))
    labels = [
        {"result": "accepted", "reason": "none"},
        {"result": "rejected", "reason": "calling_ae_not_allowed"},
        {"result": "rejected", "reason": "host_not_allowed"},
    ]
    before = samples("mammonode_associations_total", labels)
    assert _echo_from(MODALITY_AE, node.port)
    assert _echo_from(MODALITY_AE, node.port)
    assert not _echo_from("INTRUDER", node.port)
    assert not _echo_from("REMOTEPACS", node.port)  # allowed, but from another host
    after = samples("mammonode_associations_total", labels)
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 1, 1]


def test_every_refusal_reason_of_the_scp_has_a_kind() -> None:
    """The SCP's reasons (audited as text) map onto bounded label values."""
    assert reason_kind(None) == "none"
    assert reason_kind(allowlist.NOT_LISTED) == "calling_ae_not_allowed"
    assert reason_kind(allowlist.WRONG_HOST) == "host_not_allowed"
    assert reason_kind(allowlist.NO_CERTIFICATE) == "certificate_required"
    assert reason_kind(allowlist.WRONG_CERTIFICATE) == "certificate_not_allowed"
    for failure in (TimeoutError(), ConnectionResetError(104, "Connection reset by peer")):
        assert reason_kind(tls.handshake_failure(failure, 10.0)) == "tls_handshake_failed"
    assert reason_kind("allow-list check failed") == "check_failed"
    assert reason_kind("rejected by the DICOM layer (diagnostic 2)") == "refused_by_dicom_layer"
    assert reason_kind("something new") == "other"


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_instances_are_counted_received_or_refused_by_named_status(
    node_scp: NodeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = node_scp()
    good = mammogram(tmp_path, "good")
    hostile = load(good)
    hostile.StudyInstanceUID = "../../x"
    invalid = {"status": "invalid_uid", "code": "0xC001"}
    full = {"status": "out_of_resources", "code": "0xA700"}
    received_before = sample("mammonode_instances_received_total")
    refused_before = samples("mammonode_instances_refused_total", [invalid, full])

    assert scu_store(node.port, [good, hostile, good]) == [
        DimseStatus.SUCCESS,
        DimseStatus.INVALID_UID,
        DimseStatus.SUCCESS,
    ]

    def disk_full(path: Path, data: bytes, *, mode: int = 0o600) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(spool, "atomic_write_bytes", disk_full)
    other = mammogram(tmp_path, "other", laterality="R", number=2)
    assert scu_store(node.port, [other]) == [DimseStatus.OUT_OF_RESOURCES]

    assert sample("mammonode_instances_received_total") - received_before == 2
    refused_after = samples("mammonode_instances_refused_total", [invalid, full])
    assert [a - b for a, b in zip(refused_after, refused_before, strict=True)] == [1, 1]


def test_transmissions_are_counted_by_outcome_and_destination_kind(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    config = NodeConfig(ae_title=NODE_AE, data_dir=tmp_path / "node")
    labels = [
        {"outcome": outcome, "destination_kind": kind}
        for outcome, kind in (("sent", "dicom"), ("failed", "dicom"), ("dead", "dicom"), ("failed", "stow"))
    ]
    before = samples("mammonode_transmissions_total", labels)
    now = utcnow()
    with storage_scp(PACS_AE) as pacs:
        here = f"{PACS_AE}@{LOOPBACK}:{pacs.port}"
        add_output(sessions, config, mammogram(tmp_path, "sent"), here, now=now)
        missing = mammogram(tmp_path, "missing", laterality="R", number=2)
        add_output(sessions, config, missing, here, now=now)
        (config.outbox_dir / STUDY / f"{load(missing).SOPInstanceUID}.dcm").unlink()  # -> dead
        nobody = f"{PACS_AE}@{LOOPBACK}:{free_port()}"  # connection refused -> failed
        add_output(sessions, config, mammogram(tmp_path, "refused", number=3), nobody, now=now)
        web = f"stow:http://{LOOPBACK}:{free_port()}/dicom-web"
        add_output(sessions, config, mammogram(tmp_path, "web", number=4), web, now=now)
        assert deliver_due(config, sessions, now) == 4
        pacs.wait_for(1)
    after = samples("mammonode_transmissions_total", labels)
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1, 1]
