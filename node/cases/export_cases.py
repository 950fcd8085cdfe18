"""De-identified exports of what the node has received, in the RSNA Screening Mammography layout.

Retraining needs the node's own cases as a dataset that `mammonode train` reads like any other:
``train.csv`` (the 14 RSNA columns) and ``train_images/<patient>/<image>.dcm``. The files leave
the node's control, so they are de-identified on the way out:

- patient and image numbers are pseudonyms: ranks of an HMAC of the patient ID (SOP Instance UID)
  under a random per-export key that is never stored, so nothing links an export back to a
  patient (the ``data.exported`` audit event records which studies went out, not the mapping);
- every name (PN), date and time is blanked, identifying attributes (birth date, other IDs,
  addresses, institution, accession number, device serial, free-text comments...) and all
  private tags are removed, and instance UIDs are re-derived under the same per-export key;
- images that say they carry burned-in annotation are left out unless asked for, because text in
  the pixels cannot be checked here.

Pixel data is copied as received (no decode, no re-encode). Which images go out: the scorable
mammograms in the spool, optionally only the breasts an outcomes CSV labels (:func:`read_outcomes`).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.orm import Session

from inference import CSV_NAME, IMAGES_DIR, RSNA_COLUMNS, MammoNodeError, derive_uid, is_valid_uid
from node.db.models import Instance, Study

log = logging.getLogger(__name__)

"""The columns of RSNA's ``train.csv`` (as :mod:`training.datasets.rsna` reads them; the node may
not import training, the export tests check the two agree)."""
SITE_ID = 1
MAX_AGE = 90
"""Ages above this are exported as this (HIPAA Safe Harbor groups 90 and over)."""

OUTCOME_COLUMNS = ("study_uid", "laterality", "cancer")
OPTIONAL_OUTCOME_COLUMNS = ("biopsy", "invasive")

REMOVE_KEYWORDS: frozenset[str] = frozenset(
    {
        "PatientBirthTime",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "IssuerOfPatientID",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientTelecomInformation",
        "MedicalRecordLocator",
        "MilitaryRank",
        "BranchOfService",
        "EthnicGroup",
        "Occupation",
        "PatientReligiousPreference",
        "PatientInsurancePlanCodeSequence",
        "PatientComments",
        "AdditionalPatientHistory",
        "ResponsiblePerson",
        "ResponsibleOrganization",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "InstitutionCodeSequence",
        "StationName",
        "DeviceSerialNumber",
        "DetectorID",
        "PlateID",
        "CassetteID",
        "GantryID",
        "ProtocolName",
        "StudyDescription",
        "ImageComments",
        "AcquisitionComments",
        "AdmissionID",
        "RequestAttributesSequence",
        "ReferencedPatientSequence",
        "ReferencedStudySequence",
        "ReferencedPerformedProcedureStepSequence",
        "PerformedProcedureStepID",
        "PerformedProcedureStepDescription",
        "RequestedProcedureID",
        "RequestedProcedureDescription",
        "ScheduledProcedureStepID",
    }
)
"""Identifying attributes removed outright (after PS3.15 E.1's basic profile)."""
BLANK_KEYWORDS: frozenset[str] = frozenset({"AccessionNumber", "StudyID", "PatientBirthDate"})
"""Type 2 attributes kept present but empty."""
BLANK_VRS: frozenset[str] = frozenset({"PN", "DA", "DT", "TM"})


class ExportError(MammoNodeError):
    """The export cannot be made: bad outcomes row, unknown study, missing spool file, ..."""


@dataclass(frozen=True)
class Outcome:
    """One row of an outcomes CSV: what became of one breast of one study."""

    line: int
    study_uid: str
    laterality: str
    cancer: int
    biopsy: int
    invasive: int


@dataclass(frozen=True)
class CaseImage:
    """One spooled image chosen for export, with the label of its breast."""

    patient_id: str
    study_uid: str
    sop_instance_uid: str
    laterality: str
    view: str
    path: Path
    cancer: int = 0
    biopsy: int = 0
    invasive: int = 0


@dataclass
class ExportSummary:
    """What :func:`export_cases` wrote. ``pseudonyms`` is kept in memory only (never written)."""

    out: Path
    images: int = 0
    studies: list[str] = field(default_factory=list)
    patients: int = 0
    breasts: int = 0
    cancer_breasts: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    pseudonyms: dict[str, int] = field(default_factory=dict, repr=False)
    """Real patient ID -> exported patient number, for the caller's split; never persisted."""

    def audit_details(self, what: str, labelled: bool) -> dict[str, Any]:
        return {
            "what": what,
            "out": str(self.out.resolve()),
            "images": self.images,
            "patients": self.patients,
            "breasts": self.breasts,
            "cancer_breasts": self.cancer_breasts,
            "labelled": labelled,
            "skipped": self.skipped,
            "studies": self.studies,
        }


def _flag(text: str, column: str, where: str) -> int:
    value = text.strip().lower()
    if value in ("1", "true", "yes"):
        return 1
    if value in ("0", "false", "no"):
        return 0
    raise ExportError(f"{where}: {column} must be 0 or 1, got {text!r}")


def read_outcomes(path: Path) -> list[Outcome]:
    """Parse an outcomes CSV (study_uid, laterality, cancer[, biopsy, invasive]), one row per breast.

    Every problem is one line naming the file, line and column; a breast given twice is an error.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            missing = [c for c in OUTCOME_COLUMNS if c not in header]
            if missing:
                raise ExportError(
                    f"{path.name} lacks column(s) {', '.join(missing)} (needs {', '.join(OUTCOME_COLUMNS)})"
                )
            rows = list(enumerate(reader, start=2))
    except FileNotFoundError:
        raise ExportError(f"outcomes file not found: {path}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ExportError(f"{path.name} is not a readable CSV: {exc}") from None
    outcomes: list[Outcome] = []
    seen: dict[tuple[str, str], int] = {}
    for line, row in rows:
        where = f"{path.name} line {line}"
        study_uid = (row.get("study_uid") or "").strip()
        if not is_valid_uid(study_uid):
            raise ExportError(f"{where}: study_uid {study_uid!r} is not a valid DICOM UID")
        laterality = (row.get("laterality") or "").strip().upper()
        if laterality not in ("L", "R"):
            raise ExportError(f"{where}: laterality must be L or R, got {row.get('laterality')!r}")
        key = (study_uid, laterality)
        if key in seen:
            raise ExportError(f"{where}: study {study_uid} {laterality} already given on line {seen[key]}")
        seen[key] = line
        optional = {c: _flag(row.get(c) or "0", c, where) for c in OPTIONAL_OUTCOME_COLUMNS}
        outcomes.append(
            Outcome(line, study_uid, laterality, _flag(row.get("cancer") or "", "cancer", where), **optional)
        )
    if not outcomes:
        raise ExportError(f"{path.name} has no outcome rows")
    return outcomes


def select_cases(
    session: Session, spool_dir: Path, outcomes: Sequence[Outcome] | None = None
) -> list[CaseImage]:
    """The scorable L/R images to export: every one in the spool, or those of the labelled breasts.

    With outcomes, an unknown study or a breast without a scorable image is an error naming
    the outcomes line, so a typo cannot silently shrink the training set.
    """
    stmt = (
        select(Instance, Study.patient_id, Study.study_uid)
        .join(Study, Instance.study_id == Study.id)
        .where(Instance.scorable.is_(True), Instance.laterality.in_(("L", "R")))
        .order_by(Study.study_uid, Instance.laterality, Instance.sop_instance_uid)
    )
    labels: dict[tuple[str, str], Outcome] | None = None
    if outcomes is not None:
        labels = {(o.study_uid, o.laterality): o for o in outcomes}
        uids = sorted({o.study_uid for o in outcomes})
        known = set(session.scalars(select(Study.study_uid).where(Study.study_uid.in_(uids))))
        for o in outcomes:
            if o.study_uid not in known:
                raise ExportError(
                    f"outcomes line {o.line}: unknown study UID {o.study_uid} (not received by this node)"
                )
        stmt = stmt.where(Study.study_uid.in_(uids))
    cases: list[CaseImage] = []
    for instance, patient_id, study_uid in session.execute(stmt):
        label = labels.get((study_uid, instance.laterality)) if labels is not None else None
        if labels is not None and label is None:
            continue
        cases.append(
            CaseImage(
                patient_id=patient_id,
                study_uid=study_uid,
                sop_instance_uid=instance.sop_instance_uid,
                laterality=instance.laterality,
                view=instance.view or "unknown",
                path=spool_dir / instance.spool_path,
                cancer=label.cancer if label else 0,
                biopsy=label.biopsy if label else 0,
                invasive=label.invasive if label else 0,
            )
        )
    if outcomes is not None:
        present = {(c.study_uid, c.laterality) for c in cases}
        for o in outcomes:
            if (o.study_uid, o.laterality) not in present:
                raise ExportError(
                    f"outcomes line {o.line}: study {o.study_uid} has no scorable "
                    f"{o.laterality} image on this node"
                )
    return cases


def _keyed_rank(key: bytes, values: Iterable[str]) -> dict[str, int]:
    """1..N in the order of an HMAC of each value: stable within one export, meaningless outside it."""
    digests = {v: hmac.new(key, v.encode("utf-8"), hashlib.sha256).digest() for v in set(values)}
    return {v: rank for rank, v in enumerate(sorted(digests, key=digests.__getitem__), start=1)}


def _is_standard_uid(value: str) -> bool:
    """A UID from the DICOM standard (SOP class, coding scheme...): kept; instance UIDs are not."""
    return UID(value).name != value


def deidentify(ds: Dataset, patient_number: int, key: bytes) -> None:
    """Strip ``ds`` of identifying content in place (see the module doc), as patient ``patient_number``."""
    ds.remove_private_tags()

    def scrub(dataset: Dataset, elem: DataElement) -> None:
        keyword = elem.keyword
        if keyword in REMOVE_KEYWORDS:
            del dataset[elem.tag]
        elif keyword in BLANK_KEYWORDS or elem.VR in BLANK_VRS:
            elem.value = ""
        elif elem.VR == "UI" and elem.value:
            values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
            new = [v if _is_standard_uid(str(v)) else derive_uid("export", key.hex(), str(v)) for v in values]
            elem.value = new if isinstance(elem.value, MultiValue) else new[0]

    ds.walk(scrub)
    ds.PatientName = f"ANONYMOUS^{patient_number}"
    ds.PatientID = str(patient_number)
    age = _age(ds)
    if age is not None:
        ds.PatientAge = f"{min(age, MAX_AGE):03d}Y"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "MammoNode export: PS3.15 basic profile subset, keyed pseudonyms"
    if getattr(ds, "file_meta", None) is not None and "SOPInstanceUID" in ds:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _age(ds: Dataset) -> int | None:
    text = str(ds.get("PatientAge", "") or "").strip().upper()
    if len(text) == 4 and text[:3].isdigit() and text[3] == "Y":
        return int(text[:3])
    return None


def _burned_in(ds: Dataset) -> bool:
    return str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES"


def export_cases(
    cases: Sequence[CaseImage], out: Path, *, include_burned_in: bool = False, key: bytes | None = None
) -> ExportSummary:
    """Write ``cases`` de-identified to ``out`` in the RSNA layout; ``out`` must be new or empty.

    ``key`` is the per-export HMAC key (random when None; pass one only in tests). The caller
    records the ``data.exported`` audit event.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"export folder {out} exists and is not empty")
    if not cases:
        raise ExportError("nothing to export: no scorable L/R mammograms selected")
    key = key or secrets.token_bytes(32)
    patients = _keyed_rank(key, (c.patient_id for c in cases))
    images = _keyed_rank(key, (c.sop_instance_uid for c in cases))
    summary = ExportSummary(out=out)
    machines: dict[tuple[str, str], int] = {}
    rows: list[tuple[int, int, list[str]]] = []
    breasts: set[tuple[str, str]] = set()
    cancer: set[tuple[str, str]] = set()
    for case in cases:
        ds, reason = _read(case.path)
        if ds is not None and _burned_in(ds) and not include_burned_in:
            reason = "burned-in annotation"
        if ds is None or reason is not None:
            summary.skipped[str(reason)] = summary.skipped.get(str(reason), 0) + 1
            continue
        machine = (str(ds.get("Manufacturer", "") or ""), str(ds.get("ManufacturerModelName", "") or ""))
        machine_id = machines.setdefault(machine, len(machines) + 1)
        implant = int(str(ds.get("BreastImplantPresent", "") or "").strip().upper() == "YES")
        age = _age(ds)
        pid, iid = patients[case.patient_id], images[case.sop_instance_uid]
        deidentify(ds, pid, key)
        target = out / IMAGES_DIR / str(pid) / f"{iid}.dcm"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target, enforce_file_format=True)
        rows.append(
            (
                pid,
                iid,
                [
                    str(SITE_ID),
                    str(pid),
                    str(iid),
                    case.laterality,
                    case.view,
                    "" if age is None else str(min(age, MAX_AGE)),
                    str(case.cancer),
                    str(case.biopsy),
                    str(case.invasive),
                    "",
                    str(implant),
                    "",
                    str(machine_id),
                    "False",
                ],
            )
        )
        breasts.add((case.study_uid, case.laterality))
        if case.cancer:
            cancer.add((case.study_uid, case.laterality))
        summary.pseudonyms[case.patient_id] = pid
        if case.study_uid not in summary.studies:
            summary.studies.append(case.study_uid)
    if not rows:
        raise ExportError(f"nothing exported: every selected image was skipped ({summary.skipped})")
    rows.sort(key=lambda r: (r[0], r[1]))
    write_csv(out / CSV_NAME, [r[2] for r in rows])
    summary.images, summary.patients = len(rows), len(summary.pseudonyms)
    summary.breasts, summary.cancer_breasts = len(breasts), len(cancer)
    _write_readme(out, summary)
    log.info(
        "exported %d images of %d studies to %s (skipped %s)",
        summary.images,
        len(summary.studies),
        out,
        summary.skipped,
    )
    return summary


def _read(path: Path) -> tuple[Dataset | None, str | None]:
    """The spooled file, or why it cannot be exported (logged with its path, which holds only UIDs)."""
    if not path.is_file():
        log.warning("spool file missing: %s", path)
        return None, "missing spool file"
    try:
        return dcmread(path), None
    except (InvalidDicomError, OSError, ValueError) as exc:
        log.warning("spool file unreadable: %s (%s)", path, type(exc).__name__)
        return None, "unreadable spool file"


def write_csv(path: Path, rows: Iterable[Sequence[str]]) -> None:
    """``train.csv`` with the RSNA header."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(RSNA_COLUMNS)
        writer.writerows(rows)


def _write_readme(out: Path, summary: ExportSummary) -> None:
    text = (
        "De-identified MammoNode export in the RSNA Screening Mammography layout.\n\n"
        f"{summary.images} images, {summary.patients} patients, {summary.breasts} breasts "
        f"({summary.cancer_breasts} with cancer according to the outcomes given).\n"
        "patient_id and image_id are pseudonyms keyed by a random per-export secret that was not kept:\n"
        "they cannot be linked back to patients, and differ between exports.\n"
        "Names, dates, times and identifying attributes are removed or blanked, private tags removed,\n"
        "instance UIDs re-derived. Without an outcomes file, cancer/biopsy/invasive are 0 (unknown).\n"
        f"Skipped images: {summary.skipped or 'none'}.\n"
    )
    (out / "README.txt").write_text(text, encoding="utf-8")
