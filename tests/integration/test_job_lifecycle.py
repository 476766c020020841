"""Every job transition from every state, allowed or refused, on SQLite and PostgreSQL: the refused ones change
nothing and write no event. Then the clock lease times are judged by, the reaper's rounds, and the checkpoints of
a worker that lost its job."""

import time
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select, update

import core.db
from app.reaper import reap_once
from core import jobs
from core.db import Database, utcnow
from core.jobs import JobStatus, Lease
from core.settings import Settings
from core.storage import DataDir
from core.tables import Checkpoint, Corpus, Job, JobEvent
from model import gpt2_tokenizer, save_checkpoint
from worker.reporting import JobReporter, StopReason

TIMEOUT_S = 60
MAX_ATTEMPTS = 3
RESEND_AFTER_S = 60
OWNER, OTHER = "worker-a", "worker-b"


def _running(session, job_id: str, *, stale: bool = False, cancel: bool = False, at_cap: bool = False) -> None:
    assert jobs.claim(session, job_id, OWNER, TIMEOUT_S, MAX_ATTEMPTS)
    beat = utcnow() - timedelta(seconds=TIMEOUT_S + 1) if stale else utcnow()
    session.execute(update(Job).where(Job.id == job_id).values(
        heartbeat_at=beat, cancel_requested=cancel, attempts=MAX_ATTEMPTS if at_cap else 1,
        sent_at=utcnow() - timedelta(seconds=RESEND_AFTER_S + 1)))  # sent long before it started


def _queued(*, unsent: bool = False, at_cap: bool = False):
    def setup(session, job_id: str) -> None:
        sent = utcnow() - timedelta(seconds=RESEND_AFTER_S + 1) if unsent else utcnow()
        session.execute(update(Job).where(Job.id == job_id).values(sent_at=sent,
                                                                   attempts=MAX_ATTEMPTS if at_cap else 0))
    return setup


def _finished(status: JobStatus):
    def setup(session, job_id: str) -> None:
        _running(session, job_id)
        assert jobs.finish(session, job_id, OWNER, status, "done")
    return setup


STATES = {
    "queued": lambda session, job_id: None,
    "unsent": _queued(unsent=True),  # its broker message may be lost
    "queued_at_cap": _queued(at_cap=True),  # handed back on its last attempt
    "running": _running,
    "stale": lambda session, job_id: _running(session, job_id, stale=True),
    "stale_at_cap": lambda session, job_id: _running(session, job_id, stale=True, at_cap=True),
    "cancelling": lambda session, job_id: _running(session, job_id, cancel=True),
    "stale_cancelling": lambda session, job_id: _running(session, job_id, stale=True, cancel=True),
    "stale_cancelling_at_cap": lambda session, job_id: _running(session, job_id, stale=True, cancel=True,
                                                                at_cap=True),
    "succeeded": _finished(JobStatus.SUCCEEDED),
    "failed": _finished(JobStatus.FAILED),
    "cancelled": _finished(JobStatus.CANCELLED),
}


def _cancel(session, job_id: str):
    jobs.request_cancel(session, session.get(Job, job_id))
    return "asked"


TRANSITIONS = {
    "claim": lambda session, job_id: jobs.claim(session, job_id, OTHER, TIMEOUT_S, MAX_ATTEMPTS),
    "heartbeat": lambda session, job_id: jobs.heartbeat(session, job_id, OWNER, step=3),
    "heartbeat_other": lambda session, job_id: jobs.heartbeat(session, job_id, OTHER, step=3),
    "request_cancel": _cancel,
    "finish": lambda session, job_id: jobs.finish(session, job_id, OWNER, JobStatus.SUCCEEDED, "ok"),
    "finish_other": lambda session, job_id: jobs.finish(session, job_id, OTHER, JobStatus.SUCCEEDED, "ok"),
    "hand_back": lambda session, job_id: jobs.hand_back(session, job_id, OWNER, "shutting down"),
    # the reaper's rounds look at every job: a case asks only about its own, so cases can share a database
    "requeue_stale": lambda session, job_id: job_id in jobs.requeue_stale(session, TIMEOUT_S, MAX_ATTEMPTS),
    "fail_unqueued": lambda session, job_id: jobs.fail_unqueued(session, job_id, "broker away"),
    "resend_unclaimed": lambda session, job_id: job_id in jobs.resend_unclaimed(session, RESEND_AFTER_S),
}

Q, R, S, F, C = JobStatus
REFUSED = object()  # the transition raises JobFinished
# state -> transition -> (what it returns, the status after, events it writes)
QUEUED = {"claim": (True, R, 1), "heartbeat": (Lease.LOST, Q, 0), "heartbeat_other": (Lease.LOST, Q, 0),
          "request_cancel": ("asked", C, 1), "finish": (False, Q, 0), "finish_other": (False, Q, 0),
          "hand_back": (False, Q, 0), "requeue_stale": (False, Q, 0), "fail_unqueued": (True, F, 1),
          "resend_unclaimed": (False, Q, 0)}
STALE = {"claim": (True, R, 1), "heartbeat": (Lease.HELD, R, 0), "heartbeat_other": (Lease.LOST, R, 0),
         "request_cancel": ("asked", R, 1), "finish": (True, S, 1), "finish_other": (False, R, 0),
         "hand_back": (True, Q, 1), "requeue_stale": (True, Q, 1), "fail_unqueued": (False, R, 0),
         "resend_unclaimed": (False, R, 0)}
# a job being cancelled is never claimed again: handed back or found silent, it ends cancelled (cap or not)
STALE_CANCELLING = {**STALE, "claim": (False, R, 0), "heartbeat": (Lease.CANCEL_REQUESTED, R, 0),
                    "hand_back": (False, C, 1), "requeue_stale": (False, C, 1)}
EXPECTED = {
    "queued": QUEUED,
    "unsent": {**QUEUED, "resend_unclaimed": (True, Q, 1)},
    # at the attempt cap a job never starts again: claimed or found silent, it fails
    "queued_at_cap": {**QUEUED, "claim": (False, F, 1)},
    "running": {**STALE, "claim": (False, R, 0), "requeue_stale": (False, R, 0)},
    "stale": STALE,
    "stale_at_cap": {**STALE, "claim": (False, F, 1), "requeue_stale": (False, F, 1)},
    "cancelling": {**STALE_CANCELLING, "requeue_stale": (False, R, 0)},
    "stale_cancelling": STALE_CANCELLING,
    "stale_cancelling_at_cap": STALE_CANCELLING,
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


@pytest.fixture
def shared_database(module_databases, database_kind):
    database = Database(module_databases(database_kind))
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
def test_transition(shared_database, state, transition):
    database = shared_database
    job_id = _new_job(database)
    with database.session() as session:
        STATES[state](session, job_id)
    with database.session() as session:
        before = session.get(Job, job_id)
        columns = {c: getattr(before, c) for c in ("status", "lease_owner", "attempts", "step", "cancel_requested",
                                                   "sent_at")}
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
            expected_data_status = status if event.type == "status" else None
            assert (event.data or {}).get("status") == expected_data_status
        changed = new_events > 0 or returned in (Lease.HELD, Lease.CANCEL_REQUESTED)
        if not changed:  # a refused transition changes nothing
            assert {c: getattr(job, c) for c in columns} == columns
        if transition == "claim" and job.status == R and changed:
            assert (job.lease_owner, job.attempts) == (OTHER, columns["attempts"] + 1)
        if transition in ("claim", "requeue_stale") and job.status == F and changed:
            assert "attempt cap" in job.error
        if job.status == Q and changed:  # sent (again) once committed
            assert job.sent_at > columns["sent_at"]
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


def _shifted_clock(hours: float):
    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + timedelta(hours=hours)
    return Clock


def test_lease_times_are_the_databases_clock_whatever_the_machines_say(database, monkeypatch):
    job_id = _new_job(database)
    monkeypatch.setattr(core.db, "datetime", _shifted_clock(-1))  # the worker's clock is an hour slow
    with database.session() as session:
        assert jobs.claim(session, job_id, OWNER, TIMEOUT_S, MAX_ATTEMPTS)
        assert jobs.heartbeat(session, job_id, OWNER) == Lease.HELD
    monkeypatch.setattr(core.db, "datetime", _shifted_clock(+1))  # the reaper's and another worker's, fast
    with database.session() as session:
        assert jobs.requeue_stale(session, TIMEOUT_S, MAX_ATTEMPTS) == []
        assert not jobs.claim(session, job_id, OTHER, TIMEOUT_S, MAX_ATTEMPTS)
        assert session.get(Job, job_id).lease_owner == OWNER


def test_leases_are_judged_in_fractions_of_a_second(database):
    """Tests beat every 0.5 s: whole seconds, as SQLite's CURRENT_TIMESTAMP has, would be too coarse."""
    job_id = _new_job(database)
    with database.session() as session:
        assert jobs.claim(session, job_id, OWNER, TIMEOUT_S, MAX_ATTEMPTS)
    with database.session() as session:
        assert jobs.requeue_stale(session, 0.5, MAX_ATTEMPTS) == []
    time.sleep(0.6)
    with database.session() as session:
        assert jobs.requeue_stale(session, 0.5, MAX_ATTEMPTS) == [job_id]


class _Broker:
    def __init__(self):
        self.sent: list[str] = []

    def send(self, job_id: str, parts: int = 1) -> None:
        self.sent += [job_id] * parts


def test_the_reaper_sends_again_a_job_whose_message_was_lost(database, tmp_path):
    settings = Settings(data_dir=tmp_path, database_url=database.url, resend_queued_after_s=0.3)
    job_id = _new_job(database)  # its message sent, then lost
    broker = _Broker()
    assert reap_once(database, broker, settings) == ([], [])
    time.sleep(0.4)
    assert reap_once(database, broker, settings) == ([], [job_id])
    assert reap_once(database, broker, settings) == ([], [])  # not again before another resend_queued_after_s
    assert broker.sent == [job_id]
    with database.session() as session:
        event = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())).first()
        assert event.type == "resend" and "sent again" in event.message


def test_a_worker_that_lost_its_job_keeps_no_checkpoint(database, tmp_path, lm):
    storage = DataDir(tmp_path)
    job_id = _new_job(database)
    with database.session() as session:
        _running(session, job_id)
    reporter = JobReporter(database, job_id, OWNER, storage)

    def checkpoint(step: int):
        directory = save_checkpoint(storage.job_checkpoints_dir(job_id) / f"step-{step}", lm, gpt2_tokenizer(),
                                    step=step)
        reporter.on_checkpoint(step, directory, {})
        return directory

    assert reporter.may_checkpoint() and checkpoint(1).is_dir()
    with database.session() as session:  # silent too long in a step: the job goes to another worker
        session.execute(update(Job).where(Job.id == job_id).values(
            heartbeat_at=utcnow() - timedelta(seconds=TIMEOUT_S + 1)))
        assert jobs.requeue_stale(session, TIMEOUT_S, MAX_ATTEMPTS) == [job_id]
        assert jobs.claim(session, job_id, OTHER, TIMEOUT_S, MAX_ATTEMPTS)
    assert not checkpoint(2).exists()  # written before the loss was known: removed, and no row
    assert reporter.stop_reason == StopReason.LEASE_LOST and not reporter.may_checkpoint()
    with database.session() as session:
        assert session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job_id)).all() == [1]
