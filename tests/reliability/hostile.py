"""The hostile-intake corpus: DICOM instances a broken or malicious peer sends, built at test time.

Each :class:`HostileCase` is a Part 10 file whose dataset bytes go over the network exactly as
written (pynetdicom streams a file's bytes after its meta when
``STORE_SEND_CHUNKED_DATASET`` is set), so cases pydicom would refuse to encode are crafted by
patching bytes. The table in tests/data/hostile/README.md lists every case with the status the
node must answer and whether it stores the instance; :data:`CASES` is that table in code.

The base image is what public CBIS-DDSM files look like: Secondary Capture class, Modality MG,
no ViewPosition, 16-bit allocated with 12 stored, an odd width. Its patient name and birth date
are probes: no log record may ever contain them.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from inference.uids import derive_uid
from node.dicom.status import DimseStatus

PATIENT_ID = "HOSTILE-PID-1"
PATIENT_NAME = "DOE^PHIPROBE"
BIRTH_DATE_PROBE = "PHIPROBE-DOB"
PROBES = ("PHIPROBE", PATIENT_NAME)
"""Text that must never appear in a log record."""
STUDY = derive_uid("tests", "reliability", "hostile")
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
SIZE = (200, 151)
"""Rows x columns: small for speed, odd width like rescaled real mammograms."""


@dataclass(frozen=True)
class HostileCase:
    """One hostile instance and what the node must do with it."""

    name: str
    what: str
    status: DimseStatus
    stored: bool
    path: Path
    sop_class: str
    """The presentation context's abstract syntax (the file meta's Media Storage SOP Class)."""
    transfer_syntax: str


# -- building blocks ------------------------------------------------------------------------------


def base_dataset(
    transfer_syntax: str = "explicit", *, number: int = 1, size: tuple[int, int] = SIZE
) -> Dataset:
    """A real-shaped Secondary Capture MG image (see the module docstring) with the PHI probes."""
    from training.synth.dicom_writer import make_dicom

    rng = np.random.default_rng(number)
    pixels = rng.integers(0, 4096, size, dtype=np.uint16)
    ds = make_dicom(
        pixels,
        patient_id=PATIENT_ID,
        study_uid=STUDY,
        laterality="L",
        view="CC",
        transfer_syntax="explicit",
        secondary_capture=True,
        sop_instance_uid=derive_uid(STUDY, "hostile", str(number)),
        instance_number=number,
    )
    ds.PatientName = PATIENT_NAME
    if transfer_syntax == "jpeg2000":
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    elif transfer_syntax == "jpegls":
        ds.compress(JPEGLSLossless, encoding_plugin="pyjpegls", generate_instance_uid=False)
    elif transfer_syntax == "rle":  # pylibjpeg-rle: GDCM's RLE encoder aborts on odd sizes
        ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    return ds


def encode(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def split(data: bytes) -> tuple[bytes, bytes]:
    """(preamble + meta, dataset) of a Part 10 file written by pydicom (group length first)."""
    group_length = struct.unpack_from("<I", data, 132 + 8)[0]
    end = 132 + 12 + group_length
    return data[:end], data[end:]


def part10(body: bytes, *, sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """A Part 10 file around the dataset bytes ``body`` with a meta saying what we choose."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buffer.getvalue() + body


def element_offset(body: bytes, keyword: str, vr: str) -> int:
    """Where the explicit-VR element ``keyword`` starts in ``body`` (before Pixel Data)."""
    tag = Tag(keyword)
    needle = struct.pack("<HH", tag.group, tag.element) + vr.encode()
    pixel = body.find(b"\xe0\x7f\x10\x00")
    at = body.find(needle, 0, pixel if pixel > 0 else len(body))
    if at < 0:
        raise LookupError(f"{keyword} ({vr}) not found")
    return at


def replace_element(body: bytes, keyword: str, vr: str, new_vr: str, value: bytes) -> bytes:
    """Re-encode one short-length element with another VR and value (pydicom would refuse to)."""
    at = element_offset(body, keyword, vr)
    old_length = struct.unpack_from("<H", body, at + 6)[0]
    tag = Tag(keyword)
    new = struct.pack("<HH", tag.group, tag.element) + new_vr.encode() + struct.pack("<H", len(value)) + value
    return body[:at] + new + body[at + 8 + old_length :]


def set_length(body: bytes, keyword: str, vr: str, length: int) -> bytes:
    """Overwrite the 16-bit length field of an element, leaving its bytes as they are."""
    at = element_offset(body, keyword, vr)
    return body[: at + 6] + struct.pack("<H", length) + body[at + 8 :]


def _siz_offset(body: bytes) -> int:
    at = body.find(b"\xff\x4f\xff\x51")
    if at < 0:
        raise LookupError("no J2K SIZ in the pixel data")
    return at


# -- the cases ------------------------------------------------------------------------------------


def _file(ds: Dataset) -> tuple[bytes, str, str, str]:
    data = encode(ds)
    return (
        data,
        str(ds.file_meta.MediaStorageSOPClassUID),
        str(ds.SOPInstanceUID),
        str(ds.file_meta.TransferSyntaxUID),
    )


Builder = Callable[[int], tuple[bytes, str, str, str]]
"""number -> (Part 10 bytes, context SOP class, SOP instance, context transfer syntax)."""


def _good_native(n: int) -> tuple[bytes, str, str, str]:
    return _file(base_dataset(number=n))


def _good_rle(n: int) -> tuple[bytes, str, str, str]:
    return _file(base_dataset("rle", number=n))


def _good_j2k(n: int) -> tuple[bytes, str, str, str]:
    return _file(base_dataset("jpeg2000", number=n))


def _truncated_native(n: int) -> tuple[bytes, str, str, str]:
    data, *rest = _file(base_dataset(number=n))
    return (data[: len(data) - 5000], *rest)  # type: ignore[return-value]


def _truncated_j2k(n: int) -> tuple[bytes, str, str, str]:
    data, *rest = _file(base_dataset("jpeg2000", number=n))
    return (data[: len(data) - 500], *rest)  # type: ignore[return-value]


def _j2k_claims_huge(n: int) -> tuple[bytes, str, str, str]:
    """A tiny J2K frame whose SIZ says 16384 x 16384 (image and tile), in a 1024 x 832 header."""
    ds = base_dataset("jpeg2000", number=n, size=(64, 64))
    data, sop_class, sop, ts = _file(ds)
    head, body = split(data)
    body = replace_element(body, "Rows", "US", "US", struct.pack("<H", 1024))
    body = replace_element(body, "Columns", "US", "US", struct.pack("<H", 832))
    siz = bytearray(body)
    at = _siz_offset(body)
    struct.pack_into(">IIIIII", siz, at + 8, 16384, 16384, 0, 0, 16384, 16384)
    return head + bytes(siz), sop_class, sop, ts


def _raw_as_j2k(n: int) -> tuple[bytes, str, str, str]:
    ds = base_dataset(number=n)
    ds.PixelData = encapsulate([bytes(ds.PixelData)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    return _file(ds)


def _native_as_j2k(n: int) -> tuple[bytes, str, str, str]:
    data, sop_class, sop, _ = _file(base_dataset(number=n))
    return (
        part10(split(data)[1], sop_class=sop_class, sop_instance=sop, transfer_syntax=JPEG2000Lossless),
        (sop_class),
        sop,
        str(JPEG2000Lossless),
    )


def _jpegls_as_j2k(n: int) -> tuple[bytes, str, str, str]:
    data, sop_class, sop, _ = _file(base_dataset("jpegls", number=n))
    body = split(data)[1]
    return (
        part10(body, sop_class=sop_class, sop_instance=sop, transfer_syntax=JPEG2000Lossless),
        (sop_class),
        sop,
        str(JPEG2000Lossless),
    )


def _patched(
    n: int, patch: Callable[[bytes], bytes], syntax: str = "explicit"
) -> tuple[bytes, str, str, str]:
    data, *rest = _file(base_dataset(syntax, number=n))
    head, body = split(data)
    return (head + patch(body), *rest)  # type: ignore[return-value]


def _rows_as_ds(n: int) -> tuple[bytes, str, str, str]:
    return _patched(n, lambda b: replace_element(b, "Rows", "US", "DS", f"{SIZE[0]} ".encode()[:4]))


def _patient_name_fd(n: int) -> tuple[bytes, str, str, str]:
    return _patched(n, lambda b: replace_element(b, "PatientName", "PN", "FD", PATIENT_NAME.encode()))


def _birth_date_probe(n: int) -> tuple[bytes, str, str, str]:
    ds = base_dataset(number=n)
    ds.PatientBirthDate = BIRTH_DATE_PROBE
    return _file(ds)


def _length_past_end(n: int) -> tuple[bytes, str, str, str]:
    return _patched(n, lambda b: set_length(b, "Modality", "CS", 0xFFF0))


def _odd_rows_length(n: int) -> tuple[bytes, str, str, str]:
    return _patched(n, lambda b: set_length(b, "Rows", "US", 3))


def _uid_variant(n: int, keyword: str, value: str) -> tuple[bytes, str, str, str]:
    ds = base_dataset(number=n)
    setattr(ds, keyword, value)
    return _file(ds)


def _big_private(n: int) -> tuple[bytes, str, str, str]:
    ds = base_dataset(number=n)
    block = ds.private_block(0x0011, "HOSTILE PEER", create=True)
    block.add_new(0x01, "OB", b"\xab" * (10 * 1024 * 1024))
    return _file(ds)


def _sop_class_mismatch(n: int) -> tuple[bytes, str, str, str]:
    data, _, sop, ts = _file(base_dataset(number=n))  # the dataset says Secondary Capture
    body = split(data)[1]
    return (
        part10(body, sop_class=MG_FOR_PRESENTATION, sop_instance=sop, transfer_syntax=ts),
        (MG_FOR_PRESENTATION),
        sop,
        ts,
    )


def _modality(n: int, modality: str) -> tuple[bytes, str, str, str]:
    ds = base_dataset(number=n)
    ds.Modality = modality
    return _file(ds)


def _too_large(n: int) -> tuple[bytes, str, str, str]:
    ds = base_dataset(number=n)
    ds.Rows, ds.Columns = 10000, 8000  # 80 million pixels; the pixel data stays small
    return _file(ds)


def _no_pixel_data(n: int) -> tuple[bytes, str, str, str]:
    ds = base_dataset(number=n)
    del ds.PixelData
    return _file(ds)


def _many_frames(n: int) -> tuple[bytes, str, str, str]:
    ds = base_dataset(number=n)
    ds.NumberOfFrames = 99999
    return _file(ds)


def _rle_bad_segments(n: int) -> tuple[bytes, str, str, str]:
    def patch(body: bytes) -> bytes:
        at = body.find(struct.pack("<II", 2, 64))  # 16-bit grey: 2 segments, the first at 64
        return body[:at] + struct.pack("<I", 3) + body[at + 4 :]

    return _patched(n, patch, "rle")


def _fragment_past_end(n: int) -> tuple[bytes, str, str, str]:
    def patch(body: bytes) -> bytes:
        at = _siz_offset(body) - 4  # the fragment's length field precedes its code stream
        return body[:at] + struct.pack("<I", 0x7FFFFFF0) + body[at + 4 :]

    return _patched(n, patch, "jpeg2000")


def _garbage(n: int) -> tuple[bytes, str, str, str]:
    sop = derive_uid(STUDY, "hostile", str(n))
    body = np.random.default_rng(n).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    return (
        part10(body, sop_class=SECONDARY_CAPTURE, sop_instance=sop, transfer_syntax=ExplicitVRLittleEndian),
        (SECONDARY_CAPTURE),
        sop,
        str(ExplicitVRLittleEndian),
    )


def _affected_uid_differs(n: int) -> tuple[bytes, str, str, str]:
    data, sop_class, _, ts = _file(base_dataset(number=n))
    other = generate_uid()
    return (
        part10(split(data)[1], sop_class=sop_class, sop_instance=other, transfer_syntax=ts),
        sop_class,
        other,
        ts,
    )


S = DimseStatus
_TABLE: tuple[tuple[str, str, DimseStatus, bool, Builder], ...] = (
    ("good_native", "control: SC MG, no ViewPosition, odd width, native", S.SUCCESS, True, _good_native),
    ("good_rle", "control: the same in RLE", S.SUCCESS, True, _good_rle),
    ("good_j2k", "control: the same in JPEG 2000 lossless", S.SUCCESS, True, _good_j2k),
    (
        "truncated_native",
        "file cut 5000 bytes inside native PixelData",
        S.UNUSABLE_PIXEL_DATA,
        False,
        _truncated_native,
    ),
    ("truncated_j2k", "file cut inside the J2K fragment", S.UNUSABLE_PIXEL_DATA, False, _truncated_j2k),
    (
        "j2k_claims_16384",
        "J2K SIZ says 16384x16384, header 1024x832",
        S.CODESTREAM_MISMATCH,
        False,
        _j2k_claims_huge,
    ),
    ("raw_as_j2k", "raw pixel bytes in a fragment, labelled J2K", S.CODESTREAM_MISMATCH, False, _raw_as_j2k),
    (
        "native_as_j2k",
        "native (not encapsulated) pixel data under J2K",
        S.UNUSABLE_PIXEL_DATA,
        False,
        _native_as_j2k,
    ),
    ("jpegls_as_j2k", "a JPEG-LS stream sent under J2K", S.CODESTREAM_MISMATCH, False, _jpegls_as_j2k),
    ("rows_as_ds", "Rows encoded as DS", S.MALFORMED_ELEMENT, False, _rows_as_ds),
    ("odd_rows_length", "Rows (US) with length 3", S.MALFORMED_ELEMENT, False, _odd_rows_length),
    ("length_past_end", "Modality length 0xFFF0, past the end", S.MALFORMED_ELEMENT, False, _length_past_end),
    ("patient_name_fd", "PatientName encoded as FD (usable image)", S.SUCCESS, True, _patient_name_fd),
    ("birth_date_probe", "PatientBirthDate PHIPROBE-DOB (usable image)", S.SUCCESS, True, _birth_date_probe),
    (
        "long_uid",
        "StudyInstanceUID of 100 digits",
        S.INVALID_UID,
        False,
        lambda n: _uid_variant(n, "StudyInstanceUID", "1." * 50),
    ),
    (
        "path_uid",
        "SeriesInstanceUID ../../PHIPROBE",
        S.INVALID_UID,
        False,
        lambda n: _uid_variant(n, "SeriesInstanceUID", "../../PHIPROBE"),
    ),
    ("big_private", "a 10 MB private OB element", S.SUCCESS, True, _big_private),
    (
        "sop_class_mismatch",
        "SC dataset in an MG context",
        S.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        False,
        _sop_class_mismatch,
    ),
    (
        "non_mg_modality",
        "Modality CT in an SC (kept, not scored)",
        S.SUCCESS,
        True,
        lambda n: _modality(n, "CT"),
    ),
    ("too_large", "Rows x Columns 10000x8000", S.IMAGE_TOO_LARGE, False, _too_large),
    ("no_pixel_data", "no PixelData element", S.UNUSABLE_PIXEL_DATA, False, _no_pixel_data),
    ("many_frames", "NumberOfFrames 99999, one frame of data", S.UNUSABLE_PIXEL_DATA, False, _many_frames),
    (
        "rle_bad_segments",
        "RLE header: 3 segments for 16-bit grey",
        S.CODESTREAM_MISMATCH,
        False,
        _rle_bad_segments,
    ),
    (
        "fragment_past_end",
        "J2K fragment length past the data",
        S.UNUSABLE_PIXEL_DATA,
        False,
        _fragment_past_end,
    ),
    ("garbage", "4 KB of random bytes after a valid meta", S.MALFORMED_ELEMENT, False, _garbage),
    (
        "affected_uid_differs",
        "request's SOP Instance UID differs",
        S.CANNOT_UNDERSTAND,
        False,
        _affected_uid_differs,
    ),
)


def build_cases(folder: Path) -> list[HostileCase]:
    """Write every case to ``folder`` and return them in table order."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for number, (name, what, status, stored, build) in enumerate(_TABLE, start=1):
        data, sop_class, _, transfer_syntax = build(number)
        path = folder / f"{name}.dcm"
        path.write_bytes(data)
        cases.append(HostileCase(name, what, status, stored, path, sop_class, transfer_syntax))
    return cases


def read_back(path: Path) -> Dataset:
    """A case file read leniently (for assertions on the cases themselves)."""
    return dcmread(path, force=True, stop_before_pixels=True)


# -- fuzzing support ------------------------------------------------------------------------------


def decode_bytes(data: bytes) -> tuple[int, ...]:
    """What the worker does with a spooled file: read it, decode the first frame (run it in a
    child process: a codec may abort). Returns the decoded shape; InputError when unusable."""
    import tempfile

    from inference.dicom_header import read_dataset
    from inference.dicom_pixels import decode_pixels

    with tempfile.TemporaryDirectory(prefix="mammonode-fuzz-") as folder:
        path = Path(folder) / "instance.dcm"
        path.write_bytes(data)
        ds = read_dataset(path)
    return tuple(decode_pixels(ds).shape)


def length_fields(data: bytes) -> list[int]:
    """Offsets of the length fields a mutation should hit: every top-level element's, every
    pixel-data item's, and the code-stream header (J2K SIZ, RLE header) of the first fragment."""
    ds = dcmread(io.BytesIO(data), defer_size=1024)
    offsets: list[int] = []
    for tag in list(ds.keys()):  # keys, not elements: iterating a Dataset converts them
        raw = ds.get_item(tag, keep_deferred=True)
        tell, length = getattr(raw, "value_tell", None), int(getattr(raw, "length", 0))
        if tell is None:
            continue
        long_form = raw.VR in ("OB", "OW", "OF", "SQ", "UT", "UN", "UC", "UR", "OD", "OL", "OV")
        offsets.append(tell - (4 if long_form or length == 0xFFFFFFFF else 2))
        if tag == Tag("PixelData") and length == 0xFFFFFFFF:
            pos = tell
            for _ in range(4):  # offset table, first fragments
                if pos + 8 > len(data):
                    break
                offsets.append(pos + 4)
                item_length = struct.unpack_from("<I", data, pos + 4)[0]
                offsets.extend(range(pos + 8, min(pos + 8 + 64, len(data)), 4))
                pos += 8 + item_length
    return [o for o in offsets if 0 <= o < len(data)]
