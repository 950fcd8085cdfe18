"""The coded concepts of the score report (:mod:`inference.writers.sr`), each with its source.

Only standard coding schemes are used (DCM = PS3.16 Annex D, SCT = SNOMED CT, UCUM, UMLS), so the
report needs no CodingSchemeIdentificationSequence and validators know every code. Each value
comes from the value set (context group, CID) or template row named next to it; a choice that
needed judgement says why.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# --- Document and groups ---------------------------------------------------------------------
PROCEDURE_SCREENING_MAMMOGRAPHY = Code("24623002", "SCT", "Screening mammography")
"""TID 1500 "Procedure reported" (BCID 100, extensible)."""
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
"""TID 1500 row "Qualitative Evaluations": the container of the document-level statements."""
COMMENT: Code = codes.DCM.Comment  # 121106, TEXT
VISUAL_EXPLANATION: Code = codes.DCM.VisualExplanation  # 130401, TID 1410 IMAGE row: the CAM capture

# --- Finding site (TID 1410 "Finding Site": SCT Breast with a CID 244 Laterality modifier) --------
BREAST: Code = codes.SCT.Breast  # 76752008
LATERALITY_CODES: dict[str, Code] = {"L": codes.SCT.Left, "R": codes.SCT.Right}  # 7771000, 24028007
BILATERAL: Code = codes.SCT.Bilateral  # 51440002

# --- Measurements (TID 1419 / TID 300) --------------------------------------------------------
PROBABILITY_OF_CANCER: Code = codes.DCM.ProbabilityOfCancer  # 111047
UNIT_NO_UNITS: Code = codes.UCUM.NoUnits  # "1": a probability is dimensionless
THRESHOLD_VALUE: Code = codes.DCM.ThresholdValue  # 122411: the decision threshold
MAXIMUM: Code = codes.SCT.Maximum  # 56851009 (CID 3488 Min/Max/Mean): exam = max over breasts

# --- Recommended follow-up: concept DCM 111053, values from CID 6028 only -------------------------
RECOMMENDED_FOLLOW_UP: Code = codes.DCM.RecommendedFollowUp  # 111053
RECALL_FOLLOW_UP = Code("386053000", "SCT", "Evaluation procedure")
"""CID 6028 "Mammography Recommended Follow-up": recall for further evaluation. CID 6028 has no
"recall" member; its other work-up members (Additional projections, Spot compression,
Magnification views, Diagnostic ultrasonography, MRI of breast) name a particular examination,
which a screening score cannot choose, whereas this one says "evaluate further" and no more."""
NORMAL_INTERVAL_FOLLOW_UP: Code = codes.DCM.NormalIntervalFollowUp  # 111140, CID 6028: no recall
FOLLOW_UP_VALUE_SET = "CID 6028"


def follow_up(recall: bool) -> Code:
    """The CID 6028 value of "Recommended Follow-up" for a recall decision."""
    return RECALL_FOLLOW_UP if recall else NORMAL_INTERVAL_FOLLOW_UP


# --- Aggregation of a breast's image probabilities (inference.aggregation) -------------------------
_STANDARD_AGGREGATIONS: dict[str, Code] = {
    "mean": codes.SCT.Mean,  # 373098007
    "max": codes.SCT.Maximum,  # 56851009
    "maximum": codes.SCT.Maximum,
    "median": codes.SCT.Median,  # 373099004
}
"""Aggregations with a standard SCT code (CID 3488 Min/Max/Mean), used as the group's coded
"Measurement Method"."""

_DESCRIPTIONS: dict[str, str] = {
    "pagg": "1 - (1 - mean(p_i^2))^n over the breast's n image probabilities p_i (seed 003)",
    "mean": "mean of the breast's image probabilities",
    "max": "maximum of the breast's image probabilities",
    "maximum": "maximum of the breast's image probabilities",
    "median": "median of the breast's image probabilities",
}


def aggregation_method_code(method: str) -> Code | None:
    """The standard coded measurement method of an aggregation, or None where there is none
    (seed 003's ``pagg``: its formula is stated in :func:`aggregation_parameter` instead)."""
    return _STANDARD_AGGREGATIONS.get(method.strip().lower())


def aggregation_parameter(method: str) -> str:
    """The TID 4019 "Algorithm Parameters" text that names a breast aggregation and its formula."""
    name = method.strip() or "unnamed"
    description = _DESCRIPTIONS.get(name.lower())
    return f"breast_aggregation={name}" + (f": {description}" if description else "")
