"""Every job transition from every state, allowed or refused, on SQLite and PostgreSQL: the refused ones change
nothing and write no event."""

from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from core import jobs
from core.db import Database, utcnow
from core.jobs import JobStatus, Lease
from core.tables import Corpus, Job, JobEvent

TIMEOUT_S = 60
OWNER, OTHER = "worker-a", "worker-b"


def _running(session, job_id: str, *, stale: bool = False, cancel: bool = False) -> None:
    assert jobs.claim(session, job_id, OWNER, TIMEOUT_S)
    if stale or cancel:
        beat = utcnow() - timedelta(seconds=TIMEOUT_S + 1) if stale else utcnow()
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=beat, cancel_requested=cancel))


def _finished(status: JobStatus):
    def setup(session, job_id: str) -> None:
        _running(session, job_id)
        assert jobs.finish(session, job_id, OWNER, status, "done")
    return setup


STATES = {
    "queued": lambda session, job_id: None,
    "running": _running,
    "stale": lambda session, job_id: _running(session, job_id, stale=True),
    "cancelling": lambda session, job_id: _running(session, job_id, cancel=True),
    "stale_cancelling": lambda session, job_id: _running(session, job_id, stale=True, cancel=True),
    "succeeded": _finished(JobStatus.SUCCEEDED),
    "failed": _finished(JobStatus.FAILED),
    "cancelled": _finished(JobStatus.CANCELLED),
}


def _cancel(session, job_id: str):
    jobs.request_cancel(session, session.get(Job, job_id))
    return "asked"


TRANSITIONS = {
    "claim": lambda session, job_id: jobs.claim(session, job_id, OTHER, TIMEOUT_S),
    "heartbeat": lambda session, job_id: jobs.heartbeat(session, job_id, OWNER, step=3),
    "heartbeat_other": lambda session, job_id: jobs.heartbeat(session, job_id, OTHER, step=3),
    "request_cancel": _cancel,
    "finish": lambda session, job_id: jobs.finish(session, job_id, OWNER, JobStatus.SUCCEEDED, "ok"),
    "finish_other": lambda session, job_id: jobs.finish(session, job_id, OTHER, JobStatus.SUCCEEDED, "ok"),
    "hand_back": lambda session, job_id: jobs.hand_back(session, job_id, OWNER, "shutting down"),
    "requeue_stale": lambda session, job_id: bool(jobs.requeue_stale(session, TIMEOUT_S)),
    "fail_unqueued": lambda session, job_id: jobs.fail_unqueued(session, job_id, "broker away"),
}

Q, R, S, F, C = JobStatus
REFUSED = object()  # the transition raises JobFinished
# state -> transition -> (what it returns, the status after, events it writes)
EXPECTED = {
    "queued": {"claim": (True, R, 1), "heartbeat": (Lease.LOST, Q, 0), "heartbeat_other": (Lease.LOST, Q, 0),
               "request_cancel": ("asked", C, 1), "finish": (False, Q, 0), "finish_other": (False, Q, 0),
               "hand_back": (False, Q, 0), "requeue_stale": (False, Q, 0), "fail_unqueued": (True, F, 1)},
    "running": {"claim": (False, R, 0), "heartbeat": (Lease.HELD, R, 0), "heartbeat_other": (Lease.LOST, R, 0),
                "request_cancel": ("asked", R, 1), "finish": (True, S, 1), "finish_other": (False, R, 0),
                "hand_back": (True, Q, 1), "requeue_stale": (False, R, 0), "fail_unqueued": (False, R, 0)},
    "stale": {"claim": (True, R, 1), "heartbeat": (Lease.HELD, R, 0), "heartbeat_other": (Lease.LOST, R, 0),
              "request_cancel": ("asked", R, 1), "finish": (True, S, 1), "finish_other": (False, R, 0),
              "hand_back": (True, Q, 1), "requeue_stale": (True, Q, 1), "fail_unqueued": (False, R, 0)},
    "cancelling": {"claim": (False, R, 0), "heartbeat": (Lease.CANCEL_REQUESTED, R, 0),
                   "heartbeat_other": (Lease.LOST, R, 0), "request_cancel": ("asked", R, 1),
                   "finish": (True, S, 1), "finish_other": (False, R, 0), "hand_back": (False, C, 1),
                   "requeue_stale": (False, R, 0), "fail_unqueued": (False, R, 0)},
    # a job being cancelled is never claimed again: handed back or found silent, it ends cancelled
    "stale_cancelling": {"claim": (False, R, 0), "heartbeat": (Lease.CANCEL_REQUESTED, R, 0),
                         "heartbeat_other": (Lease.LOST, R, 0), "request_cancel": ("asked", R, 1),
                         "finish": (True, S, 1), "finish_other": (False, R, 0), "hand_back": (False, C, 1),
                         "requeue_stale": (False, C, 1), "fail_unqueued": (False, R, 0)},
}
for final in (S, F, C):
    EXPECTED[str(final)] = {name: (Lease.LOST if name.startswith("heartbeat") else
                                   REFUSED if name == "request_cancel" else False, final, 0)
                            for name in TRANSITIONS}

CASES = [(state, transition) for state in STATES for transition in TRANSITIONS]


@pytest.fixture
def database(migrated_database_url):
    database = Database(migrated_database_url)
    yield database
    database.dispose()


def _new_job(database: Database) -> str:
    with database.session() as session:
        corpus = Corpus(name="c", kind="text", filename="c.txt", format="txt", size_bytes=1, sha256="0" * 64,
                        n_records=1)
        session.add(corpus)
        session.flush()
        return jobs.create(session, type="pretrain", corpus_id=corpus.id, spec={}, seed=1, total_steps=5).id


def _events(session, job_id: str) -> int:
    return session.scalar(select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id))


@pytest.mark.parametrize("state, transition", CASES, ids=[f"{s}-{t}" for s, t in CASES])
def test_transition(database, state, transition):
    job_id = _new_job(database)
    with database.session() as session:
        STATES[state](session, job_id)
    with database.session() as session:
        before = session.get(Job, job_id)
        columns = {c: getattr(before, c) for c in ("status", "lease_owner", "attempts", "step", "cancel_requested")}
        events_before = _events(session, job_id)
    returned, status, new_events = EXPECTED[state][transition]
    with database.session() as session:
        if returned is REFUSED:
            with pytest.raises(jobs.JobFinished):
                TRANSITIONS[transition](session, job_id)
        else:
            assert TRANSITIONS[transition](session, job_id) == returned
    with database.session() as session:
        job = session.get(Job, job_id)
        assert job.status == status
        assert _events(session, job_id) - events_before == new_events
        if new_events:
            event = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                                    .order_by(JobEvent.id.desc()).limit(1)).one()
            expected_data_status = None if event.type == "cancel" else status
            assert (event.data or {}).get("status") == expected_data_status
        changed = new_events > 0 or returned in (Lease.HELD, Lease.CANCEL_REQUESTED)
        if not changed:  # a refused transition changes nothing
            assert {c: getattr(job, c) for c in columns} == columns
        if transition == "claim" and changed:
            assert (job.lease_owner, job.attempts) == (OTHER, columns["attempts"] + 1)
        if transition.startswith("heartbeat") and changed:
            assert job.step == 3
        if job.status in jobs.FINISHED:
            assert job.finished_at is not None and job.lease_owner is None
        if job.status == Q:
            assert job.lease_owner is None


def test_finish_takes_only_a_final_status(database):
    job_id = _new_job(database)
    with database.session() as session:
        _running(session, job_id)
        with pytest.raises(ValueError, match="final"):
            jobs.finish(session, job_id, OWNER, JobStatus.QUEUED, "no")
