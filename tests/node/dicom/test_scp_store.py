"""The node's C-STORE SCP over real loopback sockets: what it stores, records, audits and refuses.

Peers are pynetdicom (sending exactly what a test builds, malformed included) and dcmtk's
storescu/echoscu (a modality the node did not write). Every database check runs on SQLite and
PostgreSQL through the ``sessions`` fixture.
"""

from __future__ import annotations

import errno
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from dicom_helpers import (
    CT_IMAGE,
    MG_FOR_PROCESSING,
    MODALITY_AE,
    NODE_AE,
    PATIENT,
    SECONDARY_CAPTURE,
    STUDY,
    NodeFactory,
    events,
    instances,
    load,
    mammogram,
    scu_store,
)
from peers import LOOPBACK, echoscu, storescu
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from inference.uids import derive_uid
from node import audit
from node.db.models import Breast, Instance, Study
from node.dicom import intake, spool
from node.dicom.sender import echo
from node.dicom.status import DimseStatus

SYNTAXES = ("explicit", "jpeg2000", "jpegls", "jpeg-lossless", "rle")


def _pixel_bytes(path: Path) -> bytes:
    return bytes(dcmread(path).PixelData)


def test_echo_answers_success(node_scp: NodeFactory) -> None:
    node = node_scp()
    result = echo(LOOPBACK, node.port, NODE_AE, MODALITY_AE)
    assert result.ok and result.status == DimseStatus.SUCCESS


def test_stores_every_syntax_as_received_and_records_it(node_scp: NodeFactory, tmp_path: Path) -> None:
    node = node_scp()
    files = [
        mammogram(tmp_path, ts, transfer_syntax=ts, laterality=side, view=view, number=n)
        for n, (ts, side, view) in enumerate(
            zip(SYNTAXES, "LLRRL", ("CC", "MLO", "CC", "MLO", "CC"), strict=True), start=1
        )
    ]
    assert scu_store(node.port, files) == [DimseStatus.SUCCESS] * len(files)

    rows = {row.sop_instance_uid: row for row in instances(node.sessions)}
    assert len(rows) == len(files) and len(node.spool_files()) == len(files)
    for path in files:
        sent = load(path)
        row = rows[sent.SOPInstanceUID]
        stored = node.config.spool_dir / row.spool_path
        assert stored == spool.spool_path(node.config, STUDY, sent.SeriesInstanceUID, sent.SOPInstanceUID)
        assert dcmread(stored).file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert _pixel_bytes(stored) == _pixel_bytes(path)
        assert row.transfer_syntax_uid == sent.file_meta.TransferSyntaxUID
        assert (row.laterality, row.view) == (sent.ImageLaterality, sent.ViewPosition)
        assert row.scorable and row.skip_reason is None and row.received_count == 1
        assert row.size_bytes == stored.stat().st_size
        assert row.association_id is not None
    with node.sessions() as session:
        study = session.scalars(select(Study)).one()
        assert (study.study_uid, study.patient_id, study.state) == (STUDY, PATIENT, "receiving")
        breasts = {b.laterality: b.dirty for b in session.scalars(select(Breast))}
    assert breasts == {"L": True, "R": True}
    received = events(node.sessions, audit.INSTANCE_RECEIVED)
    assert {e.sop_instance_uid for e in received} == set(rows)
    assert all((e.patient_id, e.study_uid, e.calling_ae) == (PATIENT, STUDY, MODALITY_AE) for e in received)
    accepted = events(node.sessions, audit.ASSOCIATION_ACCEPTED)
    assert len(accepted) == 1 and accepted[0].calling_ae == MODALITY_AE
    assert accepted[0].peer and accepted[0].peer.startswith(f"{LOOPBACK}:")


@pytest.mark.dcmtk
def test_dcmtk_storescu_j2k_and_jpegls(node_scp: NodeFactory, tmp_path: Path) -> None:
    node = node_scp()
    assert echoscu(node.port, NODE_AE).returncode == 0
    j2k = mammogram(tmp_path, "j2k", transfer_syntax="jpeg2000", number=1)
    jls = mammogram(tmp_path, "jls", transfer_syntax="jpegls", laterality="R", number=2)
    for path, flag in ((j2k, "-xv"), (jls, "-xt")):
        run = storescu([path], node.port, syntax=flag)
        assert run.returncode == 0, run.stderr
    rows = {row.sop_instance_uid: row for row in instances(node.sessions)}
    for path in (j2k, jls):
        sent = load(path)
        stored = node.config.spool_dir / rows[sent.SOPInstanceUID].spool_path
        assert dcmread(stored).file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert _pixel_bytes(stored) == _pixel_bytes(path)
    assert len(events(node.sessions, audit.INSTANCE_RECEIVED)) == 2


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_hostile_uids_are_refused_and_nothing_is_written(node_scp: NodeFactory, tmp_path: Path) -> None:
    node = node_scp()
    good = mammogram(tmp_path, "good")
    hostile = []
    for keyword, value in (("StudyInstanceUID", "../../x"), ("SeriesInstanceUID", "1.2/../../../etc")):
        ds = load(good)
        setattr(ds, keyword, value)
        hostile.append(ds)
    before = set(tmp_path.rglob("*"))

    assert scu_store(node.port, hostile) == [DimseStatus.INVALID_UID] * 2
    written = {p for p in set(tmp_path.rglob("*")) - before if not p.name.startswith("node.sqlite")}
    assert written == set() and node.spool_files() == []
    assert instances(node.sessions) == []
    refused = events(node.sessions, audit.INSTANCE_REJECTED)
    assert [(e.details or {}).get("status") for e in refused] == ["INVALID_UID"] * 2
    assert all(e.study_uid is None for e in refused)  # the hostile text is not filed as a UID
    # the server keeps serving
    assert scu_store(node.port, [good]) == [DimseStatus.SUCCESS]
    assert len(instances(node.sessions)) == 1


def test_sop_class_mismatch(node_scp: NodeFactory, tmp_path: Path) -> None:
    """The dataset says MG For Presentation, the context (and file meta) Secondary Capture."""
    node = node_scp()
    ds = load(mammogram(tmp_path, "mg"))
    ds.file_meta.MediaStorageSOPClassUID = UID(SECONDARY_CAPTURE)
    path = tmp_path / "mismatch.dcm"
    ds.save_as(path)  # as is: enforcing the file format would rewrite the file meta's SOP class

    ae = AE(MODALITY_AE)
    ae.add_requested_context(SECONDARY_CAPTURE, [ExplicitVRLittleEndian])
    assoc = ae.associate(LOOPBACK, node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        import pynetdicom._config as pynetdicom_config

        # chunked sending takes the SOP class from the file meta, so the mismatch goes out as is
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
        status = assoc.send_c_store(path)
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()
    assert status.Status == DimseStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert instances(node.sessions) == [] and node.spool_files() == []


def test_disk_full_is_out_of_resources_and_records_nothing(
    node_scp: NodeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = node_scp()

    def full(path: Path, data: bytes, *, mode: int = 0o644) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(spool, "atomic_write_bytes", full)
    assert scu_store(node.port, [mammogram(tmp_path, "a")]) == [DimseStatus.OUT_OF_RESOURCES]
    assert instances(node.sessions) == []
    with node.sessions() as session:
        assert session.scalars(select(Study)).all() == []
    assert [(e.details or {}).get("status") for e in events(node.sessions, audit.INSTANCE_REJECTED)] == [
        "OUT_OF_RESOURCES"
    ]


def test_success_only_once_the_row_is_committed(
    node_scp: NodeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Success means the row is visible to any other session the moment the SCU has it; a receipt
    that cannot be committed is never answered Success."""
    node = node_scp()
    first, second = mammogram(tmp_path, "a"), mammogram(tmp_path, "b", laterality="R", number=2)
    assert scu_store(node.port, [first]) == [DimseStatus.SUCCESS]
    with node.sessions() as session:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == load(first).SOPInstanceUID))
        assert (node.config.spool_dir / row.one().spool_path).is_file()

    real = intake.register_instance

    def broken_commit(session, *args, **kwargs):  # type: ignore[no-untyped-def]
        real(session, *args, **kwargs)
        raise OperationalError("COMMIT", {}, Exception("database is locked"))

    monkeypatch.setattr(intake, "register_instance", broken_commit)
    assert scu_store(node.port, [second]) == [DimseStatus.DATABASE_UNAVAILABLE]
    assert [r.sop_instance_uid for r in instances(node.sessions)] == [load(first).SOPInstanceUID]


def _variant(path: Path, **tags: object) -> Dataset:
    ds = load(path)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    if "SOPClassUID" in tags:
        ds.file_meta.MediaStorageSOPClassUID = UID(str(tags["SOPClassUID"]))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def test_for_processing_and_non_mammography_are_recorded_and_skipped(
    node_scp: NodeFactory, tmp_path: Path
) -> None:
    node = node_scp()
    base = mammogram(tmp_path, "base")
    processing = _variant(base, SOPClassUID=MG_FOR_PROCESSING, PresentationIntentType="FOR PROCESSING")
    sc_mg = _variant(base, SOPClassUID=SECONDARY_CAPTURE)
    sc_other = _variant(base, SOPClassUID=SECONDARY_CAPTURE, Modality="OT")
    assert scu_store(node.port, [processing, sc_mg, sc_other]) == [DimseStatus.SUCCESS] * 3

    rows = {r.sop_instance_uid: r for r in instances(node.sessions)}
    assert not rows[processing.SOPInstanceUID].scorable
    assert rows[processing.SOPInstanceUID].skip_reason == intake.FOR_PROCESSING_REASON
    assert rows[sc_mg.SOPInstanceUID].scorable
    assert not rows[sc_other.SOPInstanceUID].scorable
    assert "not mammography" in (rows[sc_other.SOPInstanceUID].skip_reason or "")
    assert len(node.spool_files()) == 3  # skipped instances are still kept


def _ct_dataset() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(CT_IMAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID = PATIENT
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = derive_uid(STUDY, "ct")
    ds.Modality = "CT"
    return ds


def test_unknown_sop_class_ignored(node_scp: NodeFactory) -> None:
    node = node_scp(unknown_sop_classes="ignore")
    ct = _ct_dataset()
    assert scu_store(node.port, [ct]) == [DimseStatus.SUCCESS]
    assert instances(node.sessions) == [] and node.spool_files() == []
    ignored = events(node.sessions, audit.INSTANCE_IGNORED)
    assert [(e.sop_instance_uid, e.study_uid, e.patient_id) for e in ignored] == [
        (ct.SOPInstanceUID, STUDY, PATIENT)
    ]


def test_unknown_sop_class_rejected_in_negotiation(node_scp: NodeFactory) -> None:
    node = node_scp(unknown_sop_classes="reject")
    ae = AE(MODALITY_AE)
    ae.add_requested_context(CT_IMAGE, [ExplicitVRLittleEndian])
    ae.add_requested_context(MG_FOR_PROCESSING, [ExplicitVRLittleEndian])
    assoc = ae.associate(LOOPBACK, node.port, ae_title=NODE_AE)
    try:
        assert assoc.is_established
        assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [MG_FOR_PROCESSING]
        assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [CT_IMAGE]
    finally:
        assoc.release()


def test_unusable_pixel_data_is_refused(node_scp: NodeFactory, tmp_path: Path) -> None:
    node = node_scp()
    base = mammogram(tmp_path, "base")
    no_pixels = _variant(base)
    del no_pixels.PixelData
    absurd = _variant(base, Rows=65535, Columns=65535)
    truncated = _variant(base)
    truncated.PixelData = bytes(truncated.PixelData)[:1000]
    assert scu_store(node.port, [no_pixels, absurd, truncated]) == [
        DimseStatus.UNUSABLE_PIXEL_DATA,
        DimseStatus.IMAGE_TOO_LARGE,
        DimseStatus.UNUSABLE_PIXEL_DATA,
    ]
    assert instances(node.sessions) == [] and node.spool_files() == []
    assert scu_store(node.port, [base]) == [DimseStatus.SUCCESS]


def test_unexpected_error_is_a_named_failure_and_the_server_keeps_serving(
    node_scp: NodeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = node_scp()

    def boom(header: Dataset) -> intake.InstanceInfo:
        raise RuntimeError("a bug")

    monkeypatch.setattr(intake, "classify", boom)
    assert scu_store(node.port, [mammogram(tmp_path, "a")]) == [DimseStatus.PROCESSING_FAILURE]
    monkeypatch.undo()
    assert scu_store(node.port, [mammogram(tmp_path, "b", number=2)]) == [DimseStatus.SUCCESS]


def test_resend_is_idempotent_and_late_arrival_reopens_the_study(
    node_scp: NodeFactory, tmp_path: Path
) -> None:
    node = node_scp()
    first = mammogram(tmp_path, "lcc")
    assert scu_store(node.port, [first]) == [DimseStatus.SUCCESS]
    with node.sessions() as session:  # pretend the study was scored meanwhile
        study = session.scalars(select(Study)).one()
        study.state = "scored"
        for breast in session.scalars(select(Breast)):
            breast.dirty = False
        session.commit()

    assert scu_store(node.port, [first]) == [DimseStatus.SUCCESS]  # a resend: nothing new
    [row] = instances(node.sessions)
    assert row.received_count == 2 and len(node.spool_files()) == 1
    with node.sessions() as session:
        assert session.scalars(select(Study)).one().state == "scored"
        assert not session.scalars(select(Breast)).one().dirty

    late = mammogram(tmp_path, "rcc", laterality="R", number=2)
    assert scu_store(node.port, [late]) == [DimseStatus.SUCCESS]
    with node.sessions() as session:
        assert session.scalars(select(Study)).one().state == "receiving"
        assert {b.laterality: b.dirty for b in session.scalars(select(Breast))} == {"L": False, "R": True}
    details = [e.details or {} for e in events(node.sessions, audit.INSTANCE_RECEIVED)]
    assert [(d["duplicate"], d["late_arrival"]) for d in details] == [
        (False, False),
        (True, False),
        (False, True),
    ]


def test_concurrent_associations_file_one_study(node_scp: NodeFactory, tmp_path: Path) -> None:
    """Four modalities push views of the same new study at once: one Study row, four instances."""
    node = node_scp()
    views = [("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")]
    files = [
        mammogram(tmp_path, f"{side}{view}", laterality=side, view=view, number=n)
        for n, (side, view) in enumerate(views, start=1)
    ]
    with ThreadPoolExecutor(len(files)) as pool:
        statuses = list(pool.map(lambda path: scu_store(node.port, [path]), files))
    assert statuses == [[DimseStatus.SUCCESS]] * len(files)
    with node.sessions() as session:
        assert len(session.scalars(select(Study)).all()) == 1
        assert {b.laterality for b in session.scalars(select(Breast))} == {"L", "R"}
    assert len(instances(node.sessions)) == len(files)


def test_max_image_pixels_is_a_setting(node_scp: NodeFactory, tmp_path: Path) -> None:
    """The receipt limit comes from the config (TOML or MAMMONODE_MAX_IMAGE_PIXELS)."""
    from node.config import load_config

    config = load_config(environ={"MAMMONODE_MAX_IMAGE_PIXELS": "1000", "MAMMONODE_MAX_ASSOCIATIONS": "3"})
    assert (config.max_image_pixels, config.max_associations) == (1000, 3)
    node = node_scp(max_image_pixels=256 * 192 - 1)
    assert scu_store(node.port, [mammogram(tmp_path, "a")]) == [DimseStatus.IMAGE_TOO_LARGE]
    refused = events(node.sessions, audit.INSTANCE_REJECTED)
    assert [(e.details or {}).get("status") for e in refused] == ["IMAGE_TOO_LARGE"]
    node = node_scp(max_image_pixels=256 * 192)
    assert scu_store(node.port, [mammogram(tmp_path, "b")]) == [DimseStatus.SUCCESS]
