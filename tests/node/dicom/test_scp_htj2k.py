"""The SCP and HTJ2K (transfer syntaxes .201 lossless, .202 lossless RPCL, .203 possibly lossy).

dcmtk 3.6.7's storescu cannot propose HTJ2K, so the modality here is a pynetdicom SCU proposing
exactly the file's syntax. The node must accept each syntax in negotiation (it offers what
:mod:`inference.dicom_pixels` can decode), store the bytes as received and re-read them to the same
pixels. Every database check runs on SQLite and PostgreSQL (``sessions``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from dicom_helpers import (
    MG_FOR_PRESENTATION,
    MODALITY_AE,
    NODE_AE,
    PATIENT,
    SIZE,
    STUDY,
    NodeFactory,
    instances,
    load,
    scu_store,
)
from peers import LOOPBACK
from pydicom import dcmread
from pydicom.uid import HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL
from pynetdicom import AE

from inference.dicom_header import read_dataset
from inference.dicom_pixels import decode_pixels
from inference.uids import derive_uid
from node.dicom.scp import decodable_transfer_syntaxes
from node.dicom.status import DimseStatus
from training.synth import make_dicom, synth_breast, write_dicom
from training.synth.htj2k import LOSSY_STEP

SYNTAXES = {"htj2k": HTJ2KLossless, "htj2k-rpcl": HTJ2KLosslessRPCL, "htj2k-lossy": HTJ2K}
"""training.synth name -> Transfer Syntax UID."""
LOSSY_TOLERANCE = 4 * LOSSY_STEP * 4096
"""The most a 12-bit phantom's value may move in HTJ2K lossy: four quantisation steps."""


def htj2k_mammogram(folder: Path, name: str, side: str, view: str, number: int) -> tuple[Path, np.ndarray]:
    """A phantom MG For Presentation file in HTJ2K syntax ``name``, and the pixels it encodes."""
    pixels, _ = synth_breast(np.random.default_rng(number), laterality=side, view=view, size=SIZE)
    ds = make_dicom(
        pixels,
        patient_id=PATIENT,
        study_uid=STUDY,
        laterality=side,
        view=view,
        transfer_syntax=name,
        sop_instance_uid=derive_uid("tests", "scp-htj2k", name),
        instance_number=number,
    )
    path = folder / f"{name}.dcm"
    write_dicom(ds, path)
    return path, pixels


def test_each_htj2k_syntax_is_accepted_in_negotiation(node_scp: NodeFactory) -> None:
    """One presentation context per syntax, each offering only that syntax: all three accepted."""
    assert set(SYNTAXES.values()) <= set(decodable_transfer_syntaxes())
    node = node_scp()
    ae = AE(MODALITY_AE)
    for syntax in SYNTAXES.values():
        ae.add_requested_context(MG_FOR_PRESENTATION, [syntax])
    assoc = ae.associate(LOOPBACK, node.port, ae_title=NODE_AE)
    assert assoc.is_established
    try:
        accepted = sorted(str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts)
    finally:
        assoc.release()
    assert accepted == sorted(SYNTAXES.values())


def test_an_htj2k_c_store_is_stored_as_received_and_reads_back_to_the_same_pixels(
    node_scp: NodeFactory, tmp_path: Path
) -> None:
    node = node_scp()
    made = [
        htj2k_mammogram(tmp_path, name, side, view, n)
        for n, (name, side, view) in enumerate(
            zip(SYNTAXES, "LRL", ("CC", "MLO", "MLO"), strict=True), start=1
        )
    ]
    files = [path for path, _ in made]
    assert scu_store(node.port, files) == [DimseStatus.SUCCESS] * len(files)  # one association

    rows = {row.sop_instance_uid: row for row in instances(node.sessions)}
    assert len(rows) == len(files) and len(node.spool_files()) == len(files)
    for name, (path, original) in zip(SYNTAXES, made, strict=True):
        sent = load(path)
        row = rows[sent.SOPInstanceUID]
        assert row.transfer_syntax_uid == SYNTAXES[name] and row.scorable and row.skip_reason is None
        stored = node.config.spool_dir / row.spool_path
        assert dcmread(stored).file_meta.TransferSyntaxUID == SYNTAXES[name]
        assert bytes(dcmread(stored).PixelData) == bytes(sent.PixelData)  # the code stream as sent
        pixels = decode_pixels(read_dataset(stored))
        if name == "htj2k-lossy":
            assert 0 < np.abs(pixels.astype(np.int64) - original).max() <= LOSSY_TOLERANCE
        else:
            np.testing.assert_array_equal(pixels, original)
