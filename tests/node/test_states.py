"""The state vocabulary and its transition tables: every state reachable, terminal states closed
except for the operator's retry and drop, and the moves the code names allowed by the tables."""

from __future__ import annotations

from enum import StrEnum

import pytest

from node.admin import queue as queue_admin
from node.db.states import (
    INITIAL,
    JOB_TRANSITIONS,
    STUDY_TRANSITIONS,
    TRANSITIONS,
    TRANSMISSION_DUE,
    TRANSMISSION_TRANSITIONS,
    JobState,
    StateError,
    StudyState,
    TransmissionState,
    can_move,
    check_sql,
    check_transition,
    move,
    values,
)
from node.dicom.intake import RECEIVING
from node.queue import claims, worker


def reachable(state_type: type[StrEnum]) -> set[StrEnum]:
    table = TRANSITIONS[state_type]
    seen = {INITIAL[state_type]}
    frontier = list(seen)
    while frontier:
        for nxt in table[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return seen


@pytest.mark.parametrize("state_type", [StudyState, JobState, TransmissionState])
def test_every_state_has_a_row_and_is_reachable_from_the_initial_state(state_type: type[StrEnum]) -> None:
    table = TRANSITIONS[state_type]
    assert set(table) == set(state_type)
    assert all(isinstance(s, state_type) for targets in table.values() for s in targets)
    assert reachable(state_type) == set(state_type)


def test_states_are_their_stored_words() -> None:
    """StrEnum members equal the strings already in the database, so no data migration."""
    assert values(StudyState) == ("receiving", "queued", "scoring", "scored", "skipped", "failed")
    assert values(JobState) == ("pending", "claimed", "done", "failed", "dropped")
    assert values(TransmissionState) == ("pending", "sent", "failed", "dead", "dropped")
    assert JobState.PENDING == "pending" and f"{JobState.PENDING}" == "pending"
    assert RECEIVING is StudyState.RECEIVING
    assert check_sql("state", JobState) == "state IN ('pending', 'claimed', 'done', 'failed', 'dropped')"


def test_terminal_states_only_open_to_the_operator() -> None:
    """Done and sent are final; failed, dead and dropped leave only by an operator's retry or drop."""
    assert JOB_TRANSITIONS[JobState.DONE] == frozenset()
    assert TRANSMISSION_TRANSITIONS[TransmissionState.SENT] == frozenset()
    for state in queue_admin.RETRYABLE_JOB:
        assert JOB_TRANSITIONS[state] <= {JobState.PENDING, JobState.DROPPED}
    for tx_state in (TransmissionState.DEAD, TransmissionState.DROPPED):
        assert TRANSMISSION_TRANSITIONS[tx_state] <= {TransmissionState.PENDING, TransmissionState.DROPPED}


def test_operator_moves_are_in_the_tables() -> None:
    for state in queue_admin.RETRYABLE_JOB:
        assert can_move(state, JobState.PENDING)
    for state in queue_admin.DROPPABLE_JOB:
        assert can_move(state, JobState.DROPPED)
    for tx_state in queue_admin.RETRYABLE_TRANSMISSION:
        assert can_move(tx_state, TransmissionState.PENDING)
    for tx_state in queue_admin.DROPPABLE_TRANSMISSION:
        assert can_move(tx_state, TransmissionState.DROPPED)
    for study_state in StudyState:  # a retried job re-queues its study, whatever state it is in
        assert can_move(study_state, StudyState.QUEUED)


def test_the_sender_works_through_the_states_it_may_settle() -> None:
    for tx_state in TransmissionState:
        settles = {TransmissionState.SENT, TransmissionState.DEAD} <= TRANSMISSION_TRANSITIONS[tx_state]
        assert settles == (tx_state in TRANSMISSION_DUE)


def test_studies_reopen_on_a_late_image_and_score_only_from_queued() -> None:
    for state in StudyState:
        assert can_move(state, StudyState.RECEIVING)
        assert can_move(state, StudyState.SCORING) == (state in (StudyState.QUEUED, StudyState.SCORING))
    assert STUDY_TRANSITIONS[StudyState.RECEIVING] == {
        StudyState.QUEUED,
        StudyState.SCORED,
        StudyState.SKIPPED,
    }


def test_named_moves() -> None:
    assert claims.CLAIM == (JobState.PENDING, JobState.CLAIMED)
    assert worker.COMPLETE == (JobState.CLAIMED, JobState.DONE)
    assert claims.START_SCORING == (StudyState.QUEUED, StudyState.SCORING)
    with pytest.raises(StateError, match="a job cannot move from pending to done"):
        move(JobState.PENDING, JobState.DONE)


def test_check_transition_reads_database_strings() -> None:
    assert check_transition("claimed", JobState.DONE) is JobState.DONE
    assert check_transition("pending", JobState.PENDING) is JobState.PENDING  # staying put is no move
    with pytest.raises(StateError, match="a transmission cannot move from sent to pending"):
        check_transition("sent", TransmissionState.PENDING)
    with pytest.raises(StateError, match=r"study state 'limbo' is not one of \('receiving'"):
        check_transition("limbo", StudyState.QUEUED)
