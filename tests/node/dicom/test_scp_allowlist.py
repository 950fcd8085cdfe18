"""The calling-AE allow-list (with optional host): who may associate, and the audit trail of it."""

from __future__ import annotations

from pathlib import Path

import pytest
from dicom_helpers import MODALITY_AE, NODE_AE, NodeFactory, events, instances, mammogram, scu_store
from peers import LOOPBACK, echoscu
from pynetdicom import AE
from sqlalchemy import select

from node import audit
from node.config import AllowedPeer
from node.db.models import Association
from node.dicom.allowlist import AllowList, normalise_address
from node.dicom.status import DimseStatus, RejectReason, RejectResult

ALLOWED = (
    AllowedPeer(MODALITY_AE),
    AllowedPeer("REMOTEPACS", "192.0.2.7"),  # TEST-NET-1: never this machine
    AllowedPeer("LOCALPACS", "127.0.0.1"),
    AllowedPeer("NAMEDPACS", "localhost"),
)


def _echo_from(calling_ae: str, port: int):  # type: ignore[no-untyped-def]
    ae = AE(calling_ae)
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae.associate(LOOPBACK, port, ae_title=NODE_AE)


@pytest.mark.parametrize(
    ("calling_ae", "reason"),
    [
        ("INTRUDER", "calling AE title not in the allow-list"),
        ("REMOTEPACS", "calling AE title not allowed from this host"),
    ],
)
def test_outsiders_are_rejected_and_audited(node_scp: NodeFactory, calling_ae: str, reason: str) -> None:
    node = node_scp(allowed_aes=ALLOWED)
    assoc = _echo_from(calling_ae, node.port)
    assert assoc.is_rejected and not assoc.is_established
    primitive = assoc.acceptor.primitive
    assert (primitive.result, primitive.diagnostic) == (
        RejectResult.PERMANENT,
        RejectReason.CALLING_AE_NOT_RECOGNISED,
    )
    [event] = events(node.sessions, audit.ASSOCIATION_REJECTED)
    assert event.calling_ae == calling_ae and (event.details or {}).get("reason") == reason
    assert event.peer is not None and event.peer.startswith(f"{LOOPBACK}:")
    with node.sessions() as session:
        row = session.scalars(select(Association)).one()
    assert (row.calling_ae, row.accepted, row.reason, row.peer_host) == (calling_ae, False, reason, LOOPBACK)
    assert events(node.sessions, audit.ASSOCIATION_ACCEPTED) == []
    allowed = _echo_from(MODALITY_AE, node.port)  # the node keeps serving
    assert allowed.is_established
    allowed.release()


@pytest.mark.parametrize("calling_ae", [MODALITY_AE, "LOCALPACS", "NAMEDPACS"])
def test_allowed_peers_are_accepted_and_linked(
    node_scp: NodeFactory, tmp_path: Path, calling_ae: str
) -> None:
    node = node_scp(allowed_aes=ALLOWED)
    assert scu_store(node.port, [mammogram(tmp_path, "a")], calling_ae=calling_ae) == [DimseStatus.SUCCESS]
    [event] = events(node.sessions, audit.ASSOCIATION_ACCEPTED)
    assert event.calling_ae == calling_ae
    with node.sessions() as session:
        row = session.scalars(select(Association)).one()
        assert row.accepted and row.calling_ae == calling_ae
    [instance] = instances(node.sessions)
    assert instance.association_id == row.id


@pytest.mark.dcmtk
def test_dcmtk_echoscu_from_unknown_ae_is_rejected(node_scp: NodeFactory) -> None:
    node = node_scp(allowed_aes=ALLOWED)
    assert echoscu(node.port, NODE_AE, aet="STRANGER").returncode != 0
    assert echoscu(node.port, NODE_AE, aet=MODALITY_AE).returncode == 0
    assert [e.calling_ae for e in events(node.sessions, audit.ASSOCIATION_REJECTED)] == ["STRANGER"]


def test_allow_list_rules() -> None:
    rules = AllowList.from_peers(ALLOWED)
    assert rules.refusal(MODALITY_AE, "203.0.113.9") is None
    assert rules.refusal("LOCALPACS", "::ffff:127.0.0.1") is None  # IPv4-mapped IPv6
    assert rules.refusal("LOCALPACS", "127.0.0.2") == "calling AE title not allowed from this host"
    assert rules.refusal("localpacs", "127.0.0.1") == "calling AE title not in the allow-list"
    assert AllowList.from_peers(()).refusal("ANYONE", "198.51.100.1") is None
    assert normalise_address("::ffff:10.0.0.1") == "10.0.0.1"
    assert normalise_address("not-an-address") == "not-an-address"
