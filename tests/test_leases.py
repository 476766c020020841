from datetime import timedelta

from sqlalchemy import update

from app.db import Database, utcnow
from app.migrate import upgrade
from app.models import Corpus, Job
from worker.leases import claim, heartbeat, release


def make_job(database: Database) -> str:
    with database.session() as session:
        corpus = Corpus(name="c", kind="text", filename="c.txt", format="txt", size_bytes=1, sha256="0" * 64,
                        n_records=1)
        session.add(corpus)
        session.flush()
        job = Job(type="pretrain", corpus_id=corpus.id, spec={}, seed=1, total_steps=1)
        session.add(job)
        session.flush()
        return job.id


def test_a_job_runs_under_one_lease_at_a_time(database_url):
    upgrade(database_url)
    database = Database(database_url)
    job_id = make_job(database)
    assert claim(database, job_id, "worker-a", timeout_s=60)
    assert not claim(database, job_id, "worker-b", timeout_s=60)  # a redelivered message: a's lease is alive
    assert heartbeat(database, job_id, "worker-a") and not heartbeat(database, job_id, "worker-b")
    with database.session() as session:  # worker-a goes silent
        session.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=61)))
    assert claim(database, job_id, "worker-b", timeout_s=60)
    assert not heartbeat(database, job_id, "worker-a")  # a learns it lost the job
    assert not release(database, job_id, "worker-a", "succeeded", "done")
    assert release(database, job_id, "worker-b", "succeeded", "done")
    assert not claim(database, job_id, "worker-c", timeout_s=0)  # finished jobs are never taken again
    with database.session() as session:
        job = session.get(Job, job_id)
        assert (job.status, job.attempts, job.lease_owner) == ("succeeded", 2, None)
    database.dispose()


def test_a_cancelled_job_is_never_claimed(database_url):
    upgrade(database_url)
    database = Database(database_url)
    job_id = make_job(database)
    with database.session() as session:
        session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True, status="cancelled"))
    assert not claim(database, job_id, "worker-a", timeout_s=60)
    database.dispose()
