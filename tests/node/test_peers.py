"""The real-peer harness itself: if Orthanc or dcmtk are driven wrongly here, every end-to-end test
built on them proves nothing, so each helper is checked against the real program."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from peers import (
    FOUR_VIEWS,
    LOOPBACK,
    ORTHANC_AET,
    STORAGE_CLASSES,
    VERIFICATION,
    Orthanc,
    OrthancError,
    echoscu,
    free_port,
    scu_modality,
    storage_scp,
    storescu,
    write_study,
)
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless
from pynetdicom import AE
from pynetdicom.status import Status

from inference.uids import derive_uid

OrthancFactory = Callable[..., Orthanc]
MODALITY = scu_modality("MODALITY")
OUT_OF_RESOURCES = 0xA700  # PS3.4 Table B.2-1, Refused: Out of Resources


def _associate(calling: str, port: int, called: str = ORTHANC_AET, store: bool = False):  # type: ignore[no-untyped-def]
    ae = AE(calling)
    ae.add_requested_context(VERIFICATION)
    if store:
        ae.add_requested_context(STORAGE_CLASSES["mg_presentation"], [JPEG2000Lossless])
    return ae.associate(LOOPBACK, port, ae_title=called)


def _echo_ok(calling: str, port: int, called: str = ORTHANC_AET) -> bool:
    assoc = _associate(calling, port, called)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == Status.SUCCESS
    finally:
        assoc.release()


def _store_ok(calling: str, port: int, path: Path) -> bool:
    assoc = _associate(calling, port, store=True)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_store(path)
        return bool(status) and status.Status == Status.SUCCESS
    finally:
        assoc.release()


def test_free_port_is_bindable_and_never_the_dicom_default() -> None:
    import socket

    ports = {free_port() for _ in range(5)}
    assert not ports & {104, 4242, 8042, 11112}
    with socket.socket() as sock:
        sock.bind((LOOPBACK, ports.pop()))


def test_written_study_is_four_j2k_views_of_one_study_and_deterministic(tmp_path: Path) -> None:
    study = derive_uid("tests", "peers-study")
    first = write_study(tmp_path / "a", patient_id="P1", study_uid=study)
    again = write_study(tmp_path / "b", patient_id="P1", study_uid=study)
    headers = [dcmread(p, stop_before_pixels=True) for p in first]
    assert [(h.ImageLaterality, h.ViewPosition) for h in headers] == list(FOUR_VIEWS)
    assert {h.StudyInstanceUID for h in headers} == {study}
    assert {h.file_meta.TransferSyntaxUID for h in headers} == {JPEG2000Lossless}
    uids = [h.SOPInstanceUID for h in headers]
    assert len(set(uids)) == 4
    assert [dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in again] == uids
    assert dcmread(first[0]).pixel_array.shape == (384, 288)


@pytest.mark.peers
def test_orthanc_starts_on_free_loopback_ports_with_a_local_only_rest_api(orthanc: OrthancFactory) -> None:
    pacs = orthanc({"modality": MODALITY})
    system = pacs.system()
    assert system["DicomAet"] == ORTHANC_AET
    assert (system["DicomPort"], system["HttpPort"]) == (pacs.dicom_port, pacs.http_port)
    assert not {pacs.dicom_port, pacs.http_port} & {4242, 8042, 11112}
    assert pacs.destination == f"ORTHANC@127.0.0.1:{pacs.dicom_port}"
    config = pacs.config()
    assert config["RemoteAccessAllowed"] is False and config["Plugins"] == []
    assert config["DicomAlwaysAllowStore"] is False
    pacs.stop()
    assert not pacs.running
    with pytest.raises(OrthancError):
        pacs.system()


@pytest.mark.peers
def test_orthanc_answers_c_echo_only_from_registered_aes_addressed_to_it(orthanc: OrthancFactory) -> None:
    pacs = orthanc({"modality": MODALITY})
    assert _echo_ok("MODALITY", pacs.dicom_port)
    assert not _echo_ok("STRANGER", pacs.dicom_port)
    assert not _echo_ok("MODALITY", pacs.dicom_port, called="NOTORTHANC")


@pytest.mark.peers
def test_orthanc_accepts_c_store_only_from_registered_aes(
    orthanc: OrthancFactory, j2k_study: list[Path]
) -> None:
    """The node's AE must be under DicomModalities for its results to land: pin that here."""
    pacs = orthanc({"modality": MODALITY})
    assert not _store_ok("STRANGER", pacs.dicom_port, j2k_study[0])
    assert pacs.instances() == []
    assert _store_ok("MODALITY", pacs.dicom_port, j2k_study[0])
    (only,) = pacs.wait_for_instances(1, timeout=10)
    assert pacs.simplified_tags(only)["SOPInstanceUID"] == dcmread(j2k_study[0]).SOPInstanceUID


@pytest.mark.peers
def test_uploaded_mammogram_is_listed_with_its_tags_and_survives_a_crash(
    orthanc: OrthancFactory, j2k_study: list[Path]
) -> None:
    source = dcmread(j2k_study[1], stop_before_pixels=True)
    pacs = orthanc()
    instance = pacs.upload(j2k_study[1])
    assert pacs.upload(j2k_study[1]) == instance  # AlreadyStored: same SOP Instance UID, same ID
    assert pacs.wait_for_instances(1, timeout=5) == [instance]
    tags = pacs.simplified_tags(instance)
    assert (tags["SOPInstanceUID"], tags["StudyInstanceUID"]) == (
        source.SOPInstanceUID,
        source.StudyInstanceUID,
    )
    full = pacs.instance_tags(instance)
    assert full["ViewCodeSequence"][0]["CodeValue"] == source.ViewCodeSequence[0].CodeValue
    assert pacs.dataset(instance).file_meta.TransferSyntaxUID == JPEG2000Lossless
    with pytest.raises(TimeoutError, match="holds 1 instance"):
        pacs.wait_for_instances(2, timeout=0.5)

    ports = (pacs.http_port, pacs.dicom_port)
    pacs.kill()  # a crashed PACS (the "destination down" tests) keeps what it had stored
    assert not pacs.running
    pacs.start()
    assert (pacs.http_port, pacs.dicom_port) == ports
    assert pacs.instances() == [instance]


@pytest.mark.peers
def test_orthanc_c_stores_a_resource_to_a_registered_modality(
    orthanc: OrthancFactory, j2k_study: list[Path]
) -> None:
    with storage_scp("TESTSCP") as scp:
        pacs = orthanc({"testscp": scp.modality})
        assert pacs.echo_modality("testscp")
        instance = pacs.upload(j2k_study[2])
        answer = pacs.send_to_modality("testscp", [instance])
        assert answer.get("FailedInstancesCount", 0) == 0
        (got,) = scp.wait_for(1, timeout=10)
        assert got.calling_ae == ORTHANC_AET
        assert got.dataset.SOPInstanceUID == dcmread(j2k_study[2], stop_before_pixels=True).SOPInstanceUID
        assert got.transfer_syntax == JPEG2000Lossless
        with pytest.raises(OrthancError):
            pacs.send_to_modality("unknown", [instance])


@pytest.mark.peers
def test_orthanc_send_to_a_modality_that_is_down_is_an_error(
    orthanc: OrthancFactory, j2k_study: list[Path]
) -> None:
    pacs = orthanc({"down": ("DOWN", LOOPBACK, free_port())})
    instance = pacs.upload(j2k_study[0])
    assert not pacs.echo_modality("down")
    with pytest.raises(OrthancError):
        pacs.send_to_modality("down", [instance])


@pytest.mark.dcmtk
def test_storescu_sends_j2k_only_when_proposing_j2k(j2k_study: list[Path]) -> None:
    with storage_scp("MAMMONODE") as scp:
        refused = storescu(j2k_study[:1], scp.port, syntax="-xe")
        assert refused.returncode != 0
        assert "unable to convert dataset" in refused.stderr  # dcmtk has no J2K codec
        assert scp.received == []

        sent = storescu(j2k_study, scp.port)
        assert sent.returncode == 0, sent.stderr
        received = scp.wait_for(4, timeout=10)
    assert {r.calling_ae for r in received} == {"MODALITY"}
    assert {r.transfer_syntax for r in received} == {JPEG2000Lossless}
    assert sorted(scp.sop_instance_uids()) == sorted(
        dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in j2k_study
    )


@pytest.mark.dcmtk
def test_storescu_exits_non_zero_when_the_scp_refuses_a_store(j2k_study: list[Path]) -> None:
    """The e2e tests trust ``returncode == 0`` to mean "the node said Success to every file"."""
    with storage_scp("MAMMONODE", status=OUT_OF_RESOURCES) as scp:
        assert storescu(j2k_study, scp.port).returncode != 0
        scp.status = int(Status.SUCCESS)
        assert storescu(j2k_study, scp.port).returncode == 0
        assert len(scp.wait_for(4, timeout=10)) == 4


@pytest.mark.dcmtk
@pytest.mark.peers
def test_echoscu_and_storescu_against_orthanc_need_a_registered_calling_ae(
    orthanc: OrthancFactory, j2k_study: list[Path]
) -> None:
    pacs = orthanc({"modality": MODALITY})
    assert echoscu(pacs.dicom_port, ORTHANC_AET).returncode == 0
    assert echoscu(pacs.dicom_port, ORTHANC_AET, aet="STRANGER").returncode != 0

    refused = storescu(j2k_study[:1], pacs.dicom_port, aec=ORTHANC_AET, aet="STRANGER")
    assert refused.returncode != 0
    assert pacs.instances() == []
    sent = storescu(j2k_study, pacs.dicom_port, aec=ORTHANC_AET)
    assert sent.returncode == 0, sent.stderr
    assert len(pacs.wait_for_instances(4, timeout=10)) == 4
