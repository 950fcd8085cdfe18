"""What the SC and SR writers share: VR length limits and the algorithm's identity in UIDs."""

from __future__ import annotations

from inference.types import AlgorithmInfo


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
