"""Source attributes every result object about a source image carries the same way: the whole
Patient and Study modules, and the mammographic view as a CID 4014 code.

A result object (CAM capture, presentation state, report) is the same patient's and study's as
its source, so it copies every attribute of those modules the source has -- from the source's
:func:`~inference.writers.common.copyable_header`, which has already dropped invalid values.
"""

from __future__ import annotations

import copy

from pydicom.dataset import Dataset

from inference.dicom_header import VIEW_CODES, read_view
from inference.types import UNKNOWN

PATIENT_AND_STUDY_KEYWORDS: tuple[str, ...] = (
    # Patient (PS3.3 C.7.1.1)
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "SourcePatientGroupIdentificationSequence",
    "GroupOfPatientsIdentificationSequence",
    "ReferencedPatientSequence",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar",
    "PatientAlternativeCalendar",
    "PatientSex",
    "QualityControlSubject",
    "StrainDescription",
    "StrainNomenclature",
    "StrainStockSequence",
    "StrainAdditionalInformation",
    "StrainCodeSequence",
    "GeneticModificationsSequence",
    "OtherPatientNames",
    "OtherPatientIDsSequence",
    "ReferencedPatientPhotoSequence",
    "EthnicGroup",
    "EthnicGroupCodeSequence",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    # Clinical Trial Subject (C.7.1.3)
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "IssuerOfClinicalTrialProtocolID",
    "OtherClinicalTrialProtocolIDsSequence",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "IssuerOfClinicalTrialSiteID",
    "ClinicalTrialSubjectID",
    "IssuerOfClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "IssuerOfClinicalTrialSubjectReadingID",
    "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    # General Study (C.7.2.1)
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence",
    "RequestingService",
    "RequestingServiceCodeSequence",
    "ReferencedStudySequence",
    "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    # Patient Study (C.7.2.2)
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
    "PatientAge",
    "PatientSize",
    "PatientSizeCodeSequence",
    "PatientBodyMassIndex",
    "MeasuredAPDimension",
    "MeasuredLateralDimension",
    "PatientWeight",
    "MedicalAlerts",
    "Allergies",
    "Occupation",
    "SmokingStatus",
    "AdditionalPatientHistory",
    "PregnancyStatus",
    "LastMenstrualDate",
    "PatientSexNeutered",
    "ReasonForVisit",
    "ReasonForVisitCodeSequence",
    "AdmissionID",
    "IssuerOfAdmissionIDSequence",
    "ServiceEpisodeID",
    "ServiceEpisodeDescription",
    "IssuerOfServiceEpisodeIDSequence",
    "PatientState",
    # Clinical Trial Study (C.7.2.3)
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
    "LongitudinalTemporalOffsetFromEvent",
    "LongitudinalTemporalEventType",
    "ClinicalTrialTimePointTypeCodeSequence",
    "IssuerOfClinicalTrialTimePointID",
    "ConsentForClinicalTrialUseSequence",
)
"""Every attribute of the Patient and Study IE modules (Patient, Clinical Trial Subject, General
Study, Patient Study, Clinical Trial Study) of an image IOD such as the SC's. A result object is
the same patient's and study's, so it carries all of them, as the source has them (highdicom's
``from_ref_dataset`` copies only a fixed handful)."""

VIEW_CODES_SCT: dict[str, tuple[str, str]] = {
    "CC": ("399162004", "cranio-caudal"),
    "MLO": ("399368009", "medio-lateral oblique"),
    "ML": ("399260004", "medial-lateral"),
    "LM": ("399352003", "latero-medial"),
    "XCCL": ("399192008", "cranio-caudal exaggerated laterally"),
    "XCCM": ("399101009", "cranio-caudal exaggerated medially"),
    "LMO": ("399099002", "latero-medial oblique"),
    "FB": ("399196006", "caudo-cranial"),
    "SIO": ("399188001", "superolateral to inferomedial oblique"),
    "ISO": ("441555000", "inferomedial to superolateral oblique"),
    "SPECIMEN": ("127457009", "tissue specimen from breast"),
}
"""CID 4014 "View for Mammography": each view's SNOMED CT code and meaning."""


def copy_patient_and_study(target: Dataset, header: Dataset) -> None:
    """Copy into ``target`` every Patient and Study module attribute of the source's copyable
    ``header``, and the character set their values are written in."""
    if "SpecificCharacterSet" in header:
        target.SpecificCharacterSet = header.SpecificCharacterSet
    for keyword in PATIENT_AND_STUDY_KEYWORDS:
        if keyword in header:
            target[keyword] = copy.deepcopy(header[keyword])


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _copied_code(item: Dataset) -> Dataset | None:
    """A Code Sequence Macro item with its three basic attributes, or ``None`` if it lacks one."""
    parts = [
        str(item.get(k, "") or "").strip() for k in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")
    ]
    if not all(parts):
        return None
    code = _code_item(*parts)
    if item.get("CodingSchemeVersion"):
        code.CodingSchemeVersion = item.CodingSchemeVersion
    return code


def _sct_view(view: str) -> Dataset | None:
    """The CID 4014 SCT code item of a view abbreviation, or ``None`` for an unknown view."""
    if view not in VIEW_CODES_SCT:
        return None
    value, meaning = VIEW_CODES_SCT[view]
    return _code_item(value, "SCT", meaning)


def view_code_sequence(source: Dataset, view: str | None) -> list[Dataset] | None:
    """A result's ViewCodeSequence (Type 3 in the SC Image module): the source's view code (CID
    4014 codes as SCT, others as they are), else the SCT code of ``view`` (``CC``, ``MLO``...) or
    of the view read from the source (ViewPosition, free text); ``None`` when the view is unknown.

    The source's view modifiers (cleavage, magnification...) are not carried over: in the SC
    Image module's view macro they are content items (concept name and value), not the plain
    codes of the Mammography Image module, and a plain code there makes the object invalid.
    """
    items = [item for item in source.get("ViewCodeSequence") or [] if isinstance(item, Dataset)]
    if items:
        first = items[0]
        known = VIEW_CODES.get(str(first.get("CodeValue", "") or "").strip(), "")
        code = _sct_view(known) or _copied_code(first)
        if code is not None:
            return [code]
    name = (view or "").strip().upper()
    if name in ("", UNKNOWN.upper()):
        name = read_view(source).upper()
    code = _sct_view(name)
    return None if code is None else [code]
