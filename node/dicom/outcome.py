"""What happened to one file sent to a destination, by C-STORE or STOW-RS (the outbox's unit)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node.dicom.status import is_success

SUCCESS_NAME = "SUCCESS"


@dataclass(frozen=True)
class SendOutcome:
    """What happened to one file: the peer's status (None if no C-STORE response, or no
    per-instance answer to a STOW-RS request) and whether a failure is permanent (a resend would
    fail the same way)."""

    path: Path
    status: int | None
    detail: str
    permanent: bool = False

    @property
    def ok(self) -> bool:
        return self.status is not None and is_success(self.status)
