"""What the SC and SR writers share: VR length limits, the algorithm's identity in UIDs, and the
source attributes that may be copied."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pydicom import config
from pydicom.datadict import DicomDictionary, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import IS, VR, DSdecimal, DSfloat, PersonName, validate_value

from inference.types import AlgorithmInfo, InputError, StudyScore
from inference.uids import derive_uid, is_valid_uid


def fit(text: str, limit: int) -> str:
    """Truncate to a VR's maximum length; an over-long value would make the object invalid."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def algorithm_key(algorithm: AlgorithmInfo) -> tuple[str, ...]:
    """Every field of the algorithm that changes the content of an output object.

    Derived UIDs include all of them, so PACS never holds two different objects under one UID.
    """
    return (
        algorithm.name,
        algorithm.version,
        algorithm.weights_sha256,
        repr(float(algorithm.threshold)),
        algorithm.notice or "",
    )


_PIXEL_GROUPS = (0x7FE0, 0x7FDF)
"""Pixel data and its private/float variants: never copied into a result header."""


def copyable_header(source: Dataset) -> tuple[Dataset, tuple[str, ...]]:
    """The source's attributes that an output may copy, and the keywords left out.

    Result objects copy the Patient and Study modules (and a few more) from their source. A value
    that a modality wrote wrongly -- a Patient's Name stored with VR FD, a birth date of
    ``PHIPROBE-DOB``, bytes that do not decode -- must not fail the whole study, so each
    top-level element is kept only if it reads back and validates against its VR, and a standard
    attribute only if it carries its dictionary VR. Pixel and overlay data are never copied. What
    is left out is named by keyword (never by value: it may be patient data) so the caller can warn.
    """
    header = Dataset()
    dropped: list[str] = []
    for tag in list(source.keys()):
        if tag.group in _PIXEL_GROUPS or 0x6000 <= tag.group <= 0x60FF:
            continue
        name = keyword_for_tag(tag) or str(tag)
        try:
            elem = source[tag]
            if not _copyable(elem):
                dropped.append(name)
                continue
        except (*_VALUE_ERRORS, InvalidDicomError):
            dropped.append(name)
            continue
        header.add(elem)
    header.file_meta = getattr(source, "file_meta", FileMetaDataset())
    return header, tuple(dropped)


_VALUE_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, UnicodeError, struct.error)


def _copyable(elem: DataElement) -> bool:
    if elem.tag.is_private or elem.tag.element == 0:
        return True  # private data is not copied by the writers; group lengths are harmless
    expected = dictionary_VR(elem.tag) if elem.tag in DicomDictionary else None
    if expected is not None and " or " not in expected and expected != elem.VR:
        return False
    if elem.VR == VR.SQ:
        return all(isinstance(item, Dataset) for item in elem.value)
    values = elem.value if elem.VM > 1 else [elem.value]
    try:
        for value in values:
            if value is None or value == "" or isinstance(value, (DSfloat, DSdecimal, IS)):
                continue  # empty, or a number pydicom has already parsed from valid text
            validate_value(elem.VR, str(value) if isinstance(value, PersonName) else value, config.RAISE)
    except (*_VALUE_ERRORS,):
        return False
    return True


def check_sources(study: StudyScore, sources: Sequence[Dataset], writer: str) -> dict[str, Dataset]:
    """The study's source headers by SOP Instance UID, checked to belong to the scored study and
    patient and to cover every scored image (``writer`` names the caller in the errors)."""
    if not sources:
        raise ValueError(f"{writer} needs the source image datasets")
    by_uid: dict[str, Dataset] = {}
    for ds in sources:
        uid = str(ds.get("SOPInstanceUID", ""))
        if not is_valid_uid(uid) or not is_valid_uid(str(ds.get("SOPClassUID", ""))):
            raise InputError(f"source has a missing or invalid SOP Instance/Class UID: {uid!r}")
        if str(ds.get("StudyInstanceUID", "")) != study.study_instance_uid:
            raise ValueError(f"source {uid} is not in study {study.study_instance_uid}")
        if "PatientID" in ds and str(ds.get("PatientID", "")) != study.patient_id:
            raise ValueError(f"source {uid} belongs to another patient than the study score")
        by_uid[uid] = ds
    missing = [img.meta.sop_instance_uid for img in study.images if img.meta.sop_instance_uid not in by_uid]
    if missing:
        raise ValueError(f"scored images without a source dataset: {missing[:3]!r}")
    return by_uid


def study_document_uids(
    namespace: str,
    study_uid: str,
    algorithm: AlgorithmInfo,
    source_uids: Sequence[str],
    result_version: int,
    *,
    what: str,
    content: tuple[str, ...] = (),
) -> tuple[str, str]:
    """Series and SOP Instance UID of a per-study document (design invariant 6), in ``namespace``.

    The instance UID depends on the *set* of source images (order does not matter), so a late
    arrival that changes the inputs yields a new document rather than silently replacing the old
    one; the same inputs and model always yield the same UIDs. ``content`` tags a change of the
    document's content, so an upgraded node never resends different content under an old UID.
    """
    if not is_valid_uid(study_uid):
        raise ValueError(f"invalid Study Instance UID {study_uid!r}")
    if result_version < 1:
        raise ValueError(f"result_version must be >= 1, got {result_version}")
    uids = sorted(set(source_uids))
    if not uids:
        raise ValueError(f"{what} needs at least one source image")
    bad = [u for u in uids if not is_valid_uid(u)]
    if bad:
        raise ValueError(f"invalid source SOP Instance UID(s): {bad[:3]!r}")
    key = algorithm_key(algorithm)
    series = derive_uid(namespace, "series", study_uid, *key, str(result_version))
    instance = derive_uid(namespace, "instance", *content, study_uid, *key, str(result_version), *uids)
    return series, instance
