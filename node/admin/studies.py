"""What `mammonode studies` shows: recent studies, their latest scores and delivery state.

Patient IDs are left out on purpose: the audit log is the one place that links patients to
studies (`mammonode audit list --patient`); this overview names studies by UID.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import Instance, Job, OutputObject, Score, Study, Transmission
from node.db.repository import latest_done_job
from node.db.states import TransmissionState

DELIVERY_STATES = (
    TransmissionState.SENT,
    TransmissionState.PENDING,
    TransmissionState.FAILED,
    TransmissionState.DEAD,
)


def recent_studies(sessions: sessionmaker[Session], limit: int = 20) -> list[dict[str, Any]]:
    """The ``limit`` most recently received studies, newest first, as plain dicts.

    Scores are those of the latest finished version; ``delivery`` counts the transmissions of
    all its versions' outputs by state (``dropped`` ones included when present).
    """
    out: list[dict[str, Any]] = []
    with sessions() as session:
        studies = session.scalars(
            select(Study).order_by(Study.last_received_at.desc(), Study.id.desc()).limit(limit)
        ).all()
        for study in studies:
            images = Counter(
                bool(s)
                for s in session.scalars(select(Instance.scorable).where(Instance.study_id == study.id))
            )
            job = latest_done_job(session, study.id)
            scores = list(session.scalars(select(Score).where(Score.job_id == job.id))) if job else []
            exam = next((s for s in scores if s.level == "exam"), None)
            delivery = {str(s): 0 for s in DELIVERY_STATES}
            rows = session.execute(
                select(Transmission.state, func.count())
                .join(OutputObject, Transmission.output_id == OutputObject.id)
                .join(Job, OutputObject.job_id == Job.id)
                .where(Job.study_id == study.id)
                .group_by(Transmission.state)
            ).all()
            for state, count in rows:
                delivery[state] = int(count)
            out.append(
                {
                    "study_uid": study.study_uid,
                    "state": study.state,
                    "last_received_at": study.last_received_at.isoformat(),
                    "images": images[True],
                    "skipped_images": images[False],
                    "version": job.version if job else None,
                    "breasts": {
                        s.laterality: s.probability for s in scores if s.level == "breast" and s.laterality
                    },
                    "exam_probability": exam.probability if exam else None,
                    "recall": exam.recall if exam else None,
                    "model": f"{exam.model_name} {exam.model_version}" if exam else None,
                    "weights_sha256": exam.weights_sha256 if exam else None,
                    "delivery": delivery,
                }
            )
    return out


def format_studies(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`recent_studies` rows."""
    header = (
        f"{'study':<64} {'state':<9} {'img':>3} {'ver':>3} {'L':>5} {'R':>5} {'exam':>5} "
        f"{'recall':<6} {'model':<24} delivery"
    )
    lines = [header]
    for row in rows:
        recall = "-" if row["recall"] is None else ("yes" if row["recall"] else "no")
        delivery = " ".join(f"{k}={v}" for k, v in row["delivery"].items() if v or k in DELIVERY_STATES)
        version = "-" if row["version"] is None else str(row["version"])
        lines.append(
            f"{row['study_uid']:<64} {row['state']:<9} {row['images']:>3} "
            f"{version:>3} {_p(row['breasts'].get('L')):>5} {_p(row['breasts'].get('R')):>5} "
            f"{_p(row['exam_probability']):>5} "
            f"{recall:<6} {row['model'] or '-':<24} {delivery}"
        )
    return "\n".join(lines)


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
