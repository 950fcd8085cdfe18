"""The coded concepts of the Mammography CAD SR (:mod:`inference.writers.cad_sr`), each with the
PS3.16 template row or context group it comes from, and the mapping of a source image's side and
view to the codes of its Image Library entry (TID 4020).

Every code here is standard (DCM, SCT, UCUM, RFC5646); the CAD SR needs no private coding scheme:
the model's region of attention is the standard "Selected region" finding (DCM 111099, a member
of CID 6014 and CID 6016) with a TEXT "Selected Region Description", and the aggregation method
is an algorithm parameter (TID 4019), not a code.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from inference.dicom_header import VIEW_CODES
from inference.writers import sr_codes

# --- TID 4000 Mammography CAD Document Root, TID 1204 Language -----------------------------------
MAMMOGRAPHY_CAD_REPORT = Code("111036", "DCM", "Mammography CAD Report")  # TID 4000 row 1 (EV)
LANGUAGE_OF_CONTENT = Code("121049", "DCM", "Language of Content Item and Descendants")  # TID 1204
ENGLISH_US = Code("en-US", "RFC5646", "English (United States)")  # CID 5000 Language
IMAGE_LIBRARY = Code("111028", "DCM", "Image Library")  # TID 4000 (EV)

# --- TID 4020 CAD Image Library Entry -------------------------------------------------------------
IMAGE_LATERALITY = Code("111027", "DCM", "Image Laterality")  # value: CID 6022 Side
IMAGE_VIEW = Code("111031", "DCM", "Image View")  # value: CID 4014 View for Mammography
IMAGE_VIEW_MODIFIER = Code("111032", "DCM", "Image View Modifier")  # value: CID 4015
PATIENT_ORIENTATION_ROW = Code("111044", "DCM", "Patient Orientation Row")
PATIENT_ORIENTATION_COLUMN = Code("111043", "DCM", "Patient Orientation Column")
STUDY_DATE = Code("111060", "DCM", "Study Date")
STUDY_TIME = Code("111061", "DCM", "Study Time")
CONTENT_DATE = Code("111018", "DCM", "Content Date")
CONTENT_TIME = Code("111019", "DCM", "Content Time")
HORIZONTAL_PIXEL_SPACING = Code("111026", "DCM", "Horizontal Pixel Spacing")
VERTICAL_PIXEL_SPACING = Code("111066", "DCM", "Vertical Pixel Spacing")
MILLIMETER = Code("mm", "UCUM", "millimeter")  # TID 4020 rows 11-12 (EV)

SIDE_CODES: dict[str, Code] = {  # CID 6022 Side
    "L": codes.SCT.LeftBreast,  # 80248007
    "R": codes.SCT.RightBreast,  # 73056007
    "B": codes.SCT.BothBreasts,  # 63762007
}

_CID_4014: tuple[Code, ...] = (
    codes.SCT.CranioCaudal,  # 399162004
    codes.SCT.MedioLateralObliqueProjection,  # 399368009
    codes.SCT.MedioLateralProjection,  # 399260004
    codes.SCT.LateroMedial,  # 399352003
    codes.SCT.LateroMedialOblique,  # 399099002
    codes.SCT.CranioCaudalExaggeratedLaterally,  # 399192008
    codes.SCT.CranioCaudalExaggeratedMedially,  # 399101009
    codes.SCT.CaudoCranial,  # 399196006
    codes.SCT.SuperolateralToInferomedialOblique,  # 399188001
    codes.SCT.InferomedialToSuperolateralOblique,  # 441555000
    codes.SCT.TissueSpecimenFromBreast,  # 127457009
)
VIEW_FOR_MAMMOGRAPHY: dict[str, Code] = {VIEW_CODES[c.value]: c for c in _CID_4014}
"""CID 4014 code per view name of :func:`inference.dicom_header.read_view` (``CC``, ``MLO``...)."""

# --- TID 4001 / 4002 overall impression -----------------------------------------------------------
CAD_PROCESSING_AND_FINDINGS_SUMMARY = Code("111017", "DCM", "CAD Processing and Findings Summary")
ALL_SUCCEEDED_WITH_FINDINGS: Code = codes.DCM.AllAlgorithmsSucceededWithFindings  # CID 6047
ALL_SUCCEEDED_WITHOUT_FINDINGS: Code = codes.DCM.AllAlgorithmsSucceededWithoutFindings  # CID 6047
NOT_ALL_SUCCEEDED_WITH_FINDINGS: Code = codes.DCM.NotAllAlgorithmsSucceededWithFindings  # CID 6047
NOT_ALL_SUCCEEDED_WITHOUT_FINDINGS: Code = codes.DCM.NotAllAlgorithmsSucceededWithoutFindings  # CID 6047
IMPRESSION_DESCRIPTION = Code("111033", "DCM", "Impression Description")  # TID 4002 row 5
# TID 4002 row 6 "Recommended Follow-up" (DCID 6028): the recall decision, coded exactly as in the
# TID 1500 score report -- SCT 386053000 "Evaluation procedure" for a recall, DCM 111140 "Normal
# interval follow-up" otherwise, both members of CID 6028 (see inference.writers.sr_codes).
RECOMMENDED_FOLLOW_UP: Code = sr_codes.RECOMMENDED_FOLLOW_UP  # 111053
follow_up = sr_codes.follow_up

# --- TID 4003 / 4004 / 4005 / 4006 / 4021 findings ------------------------------------------------
INDIVIDUAL_IMPRESSION = Code("111034", "DCM", "Individual Impression/Recommendation")
RENDERING_INTENT = Code("111056", "DCM", "Rendering Intent")  # value: CID 6034
PRESENTATION_REQUIRED: Code = codes.DCM.PresentationRequiredRenderingDeviceIsExpectedToPresent  # 111150
PRESENTATION_OPTIONAL: Code = codes.DCM.PresentationOptionalRenderingDeviceMayPresent  # 111151
COMPOSITE_FEATURE = Code("111015", "DCM", "Composite Feature")  # value: CID 6016
COMPOSITE_TYPE = Code("111016", "DCM", "Composite type")  # value: CID 6035
RELATED_SPATIALLY: Code = codes.DCM.TargetContentItemsAreRelatedSpatially  # 111154
SCOPE_OF_FEATURE = Code("111057", "DCM", "Scope of Feature")  # value: CID 6036
ON_MULTIPLE_IMAGES: Code = codes.DCM.FeatureDetectedOnMultipleImages  # 111158
SINGLE_IMAGE_FINDING = Code("111059", "DCM", "Single Image Finding")  # value: CID 6014
SELECTED_REGION: Code = codes.DCM.SelectedRegion  # 111099, in CID 6014 and CID 6016
SELECTED_REGION_DESCRIPTION = Code("111058", "DCM", "Selected Region Description")
PROBABILITY_OF_CANCER: Code = codes.DCM.ProbabilityOfCancer  # 111047 (TID 4005 row 5, TID 4006)
PERCENT: Code = codes.UCUM.Percent  # "%", the unit those rows require (0-100)
CENTER: Code = codes.DCM.Center  # 111010, TID 4021 (SCOORD POINT)
OUTLINE: Code = codes.DCM.Outline  # 111041, TID 4021 (SCOORD POLYLINE, closed)

# --- TID 4015-4018 summaries of detections and analyses -------------------------------------------
SUMMARY_OF_DETECTIONS = Code("111064", "DCM", "Summary of Detections")  # value: CID 6042
SUMMARY_OF_ANALYSES = Code("111065", "DCM", "Summary of Analyses")  # value: CID 6042
SUCCEEDED: Code = codes.DCM.Succeeded  # 111222
PARTIALLY_SUCCEEDED: Code = codes.DCM.PartiallySucceeded  # 111223
SUCCESSFUL_DETECTIONS = Code("111063", "DCM", "Successful Detections")
FAILED_DETECTIONS = Code("111025", "DCM", "Failed Detections")
DETECTION_PERFORMED = Code("111022", "DCM", "Detection Performed")  # $DetectionCode: CID 6014
SUCCESSFUL_ANALYSES = Code("111062", "DCM", "Successful Analyses")
ANALYSIS_PERFORMED = Code("111004", "DCM", "Analysis Performed")  # $AnalysisCode: CID 6043
# Spelled out: pydicom's meanings of these two carry a zero-width space from the standard's HTML.
INDIVIDUAL_ANALYSIS = Code("111233", "DCM", "Individual Impression/Recommendation Analysis")
OVERALL_ANALYSIS = Code("111234", "DCM", "Overall Impression/Recommendation Analysis")

# --- TID 4019 Algorithm Identification ------------------------------------------------------------
ALGORITHM_NAME: Code = codes.DCM.AlgorithmName  # 111001
ALGORITHM_VERSION: Code = codes.DCM.AlgorithmVersion  # 111003
ALGORITHM_PARAMETERS: Code = codes.DCM.AlgorithmParameters  # 111002

_SCT_CODE = re.compile(r"^[0-9]+$")


def side_code(source: Dataset, fallback: str) -> Code | None:
    """CID 6022 code of an image's side: ImageLaterality, then Laterality, then ``fallback`` (the
    side :mod:`inference.dicom_header` read, e.g. from text); ``None`` when none names one."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(source.get(keyword, "") or "").strip().upper()
        if value in SIDE_CODES:
            return SIDE_CODES[value]
    return SIDE_CODES.get(fallback.strip().upper())


def view_code(source: Dataset, fallback: str) -> Code | None:
    """CID 4014 code of an image's view: its ViewCodeSequence (legacy SRT codes mapped to SCT), else
    the view name ``fallback`` (``CC``, ``MLO``... as read from ViewPosition or text); ``None`` for
    a view that names no CID 4014 concept, which is left out rather than guessed."""
    for item in source.get("ViewCodeSequence", None) or ():
        name = VIEW_CODES.get(str(item.get("CodeValue", "")).strip())
        if name in VIEW_FOR_MAMMOGRAPHY:
            return VIEW_FOR_MAMMOGRAPHY[name]
    return VIEW_FOR_MAMMOGRAPHY.get(fallback.strip().upper())


def view_modifier_codes(source: Dataset) -> list[Code]:
    """CID 4015 view modifiers of the source's ViewCodeSequence, in SCT (others are left out)."""
    found: list[Code] = []
    for item in source.get("ViewCodeSequence", None) or ():
        for modifier in item.get("ViewModifierCodeSequence", None) or ():
            value = str(modifier.get("CodeValue", "")).strip()
            meaning = str(modifier.get("CodeMeaning", "")).strip()
            if modifier.get("CodingSchemeDesignator") == "SCT" and _SCT_CODE.match(value) and meaning:
                found.append(Code(value, "SCT", meaning))
    return found
