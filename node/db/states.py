"""The states a study, a job and a transmission can be in, and the moves between them.

One module so the words are spelled once: the models default to these members, the migrations
build CHECK constraints from them, and the queue code compares against them. ``StrEnum`` members
are their strings, so the values stored in the database are the plain words (``"pending"``) and
rows written before this module existed read back unchanged.

Each entity's allowed moves live in one table here (``*_TRANSITIONS``: from a state to the states
it may move to). Code that changes a state on a loaded row calls :func:`check_transition`; code
that changes it with a conditional ``UPDATE ... WHERE state = old`` names its move with
:func:`move`, which checks the pair against the table once, when the module is imported.

A breast has no state column: its one flag, ``dirty`` (new scorable images since it was last
scored), is a boolean and needs no vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, Generic, NamedTuple, TypeVar

from inference import MammoNodeError


class StudyState(StrEnum):
    """Where a study is in assembly and scoring (``studies.state``)."""

    RECEIVING = "receiving"
    """Instances are arriving; assembly waits for the expected views or the quiet period."""
    QUEUED = "queued"
    """A job for it is pending."""
    SCORING = "scoring"
    """A worker holds its job."""
    SCORED = "scored"
    SKIPPED = "skipped"
    """Nothing scorable in it (not a mammogram, For Processing images only, ...)."""
    FAILED = "failed"
    """Its job failed for good; an operator may retry it."""


class JobState(StrEnum):
    """One scoring of a study (``jobs.state``)."""

    PENDING = "pending"
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"
    DROPPED = "dropped"
    """Taken out of the queue by an operator."""


class TransmissionState(StrEnum):
    """One output object to one destination (``transmissions.state``)."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    """Will be tried again after a backoff."""
    DEAD = "dead"
    """Refused for good by the peer, or still failing after ``retry_max_age_hours``."""
    DROPPED = "dropped"
    """Taken out of the queue by an operator."""


S = TypeVar("S", bound=StrEnum)

# A worker that finishes or fails a job settles its study from whatever state it finds, except
# ``receiving`` (a late image wins): an operator may have re-queued the study meanwhile.
_SETTLED = frozenset({StudyState.SCORED, StudyState.SKIPPED, StudyState.FAILED, StudyState.QUEUED})
# A fresh scorable image reopens a study in any state; an operator retry re-queues it.
_REOPENED = frozenset({StudyState.RECEIVING, StudyState.QUEUED})

STUDY_TRANSITIONS: Mapping[StudyState, frozenset[StudyState]] = {
    # assembly: queued for a new version, resent copies of scored images, nothing scorable
    StudyState.RECEIVING: frozenset({StudyState.QUEUED, StudyState.SCORED, StudyState.SKIPPED}),
    # a worker claims the job (the only way into ``scoring``)
    StudyState.QUEUED: frozenset({StudyState.SCORING}) | _REOPENED | _SETTLED,
    StudyState.SCORING: _REOPENED | _SETTLED,
    StudyState.SCORED: _REOPENED | _SETTLED,
    StudyState.SKIPPED: _REOPENED | _SETTLED,
    StudyState.FAILED: _REOPENED | _SETTLED,
}
"""Study states are never final: a late image reopens any study (``receiving``)."""

JOB_TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.CLAIMED}),  # a worker claims it
    # finished; failed for good; back to pending (a retry after a fault, or a stale claim)
    JobState.CLAIMED: frozenset({JobState.DONE, JobState.FAILED, JobState.PENDING}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset({JobState.PENDING, JobState.DROPPED}),  # operator retry, drop
    JobState.DROPPED: frozenset({JobState.PENDING}),  # operator retry
}

TRANSMISSION_TRANSITIONS: Mapping[TransmissionState, frozenset[TransmissionState]] = {
    # the sender's outcomes; an operator may drop it, or retry it (due now)
    TransmissionState.PENDING: frozenset(
        {
            TransmissionState.SENT,
            TransmissionState.FAILED,
            TransmissionState.DEAD,
            TransmissionState.PENDING,
            TransmissionState.DROPPED,
        }
    ),
    TransmissionState.FAILED: frozenset(
        {
            TransmissionState.SENT,
            TransmissionState.FAILED,
            TransmissionState.DEAD,
            TransmissionState.PENDING,
            TransmissionState.DROPPED,
        }
    ),
    TransmissionState.SENT: frozenset(),
    TransmissionState.DEAD: frozenset({TransmissionState.PENDING, TransmissionState.DROPPED}),  # operator
    TransmissionState.DROPPED: frozenset({TransmissionState.PENDING}),  # operator retry
}

TRANSMISSION_DUE = (TransmissionState.PENDING, TransmissionState.FAILED)
"""The transmissions the sender still works through, when their ``next_attempt_at`` comes."""

TRANSITIONS: Mapping[type[StrEnum], Mapping[Any, frozenset[Any]]] = {
    StudyState: STUDY_TRANSITIONS,
    JobState: JOB_TRANSITIONS,
    TransmissionState: TRANSMISSION_TRANSITIONS,
}
"""Each entity's table, by its state enum."""

INITIAL: Mapping[type[StrEnum], StrEnum] = {
    StudyState: StudyState.RECEIVING,
    JobState: JobState.PENDING,
    TransmissionState: TransmissionState.PENDING,
}
"""The state each entity's rows are created in (the models' defaults)."""


class StateError(MammoNodeError):
    """A state change the entity's transition table does not allow: a bug, not an input fault."""


class Move(NamedTuple, Generic[S]):
    """One allowed move, for a conditional ``UPDATE ... WHERE state = old SET state = new``."""

    old: S
    new: S


def _entity(state_type: type[StrEnum]) -> str:
    return state_type.__name__.removesuffix("State").lower()


def can_move(old: S | str, new: S) -> bool:
    """Whether a row of ``new``'s entity may go from ``old`` to ``new``; staying put is no move."""
    state_type = type(new)
    old_state = state_type(old)
    return old_state == new or new in TRANSITIONS[state_type][old_state]


def check_transition(old: S | str, new: S) -> S:
    """``new``, if the entity's table allows moving from ``old`` to it; else :class:`StateError`.

    ``old`` may be the plain string read from the database.
    """
    state_type = type(new)
    try:
        allowed = can_move(old, new)
    except ValueError:
        raise StateError(f"{_entity(state_type)} state {old!r} is not one of {values(state_type)}") from None
    if not allowed:
        raise StateError(f"a {_entity(state_type)} cannot move from {old} to {new}")
    return new


def move(old: S, new: S) -> Move[S]:
    """The pair ``(old, new)`` after checking the table allows it (at import, where it is named)."""
    check_transition(old, new)
    return Move(old, new)


def values(state_type: Iterable[StrEnum]) -> tuple[str, ...]:
    """The stored words of a state enum, in declaration order (for CHECK constraints)."""
    return tuple(str(s) for s in state_type)


def check_sql(column: str, state_type: Iterable[StrEnum]) -> str:
    """The SQL condition of the CHECK constraint that keeps ``column`` within ``state_type``."""
    return f"{column} IN ({', '.join(repr(v) for v in values(state_type))})"
