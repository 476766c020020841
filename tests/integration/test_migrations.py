from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text

import core.tables  # noqa: F401
from core import jobs
from core.db import Base, Database, utcnow
from core.migrate import downgrade, upgrade
from core.tables import Checkpoint, Corpus, Job, Metric


def test_migrations_create_exactly_the_models(database_url):
    upgrade(database_url)
    database = Database(database_url)
    with database.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}),
                                Base.metadata)
    assert diff == []
    assert {"corpora", "jobs", "job_events", "metrics", "checkpoints", "deployments", "api_keys"} <= set(
        inspect(database.engine).get_table_names())
    database.dispose()


def test_downgrade_and_upgrade_again(database_url):
    upgrade(database_url)
    downgrade(database_url, "base")
    database = Database(database_url)
    assert "jobs" not in inspect(database.engine).get_table_names()
    database.dispose()
    upgrade(database_url)


def test_rows_round_trip_with_utc_times_and_json(database_url):
    upgrade(database_url)
    database = Database(database_url)
    with database.session() as session:
        corpus = Corpus(name="verdict", kind="text", filename="the-verdict.txt", format="txt", size_bytes=10,
                        sha256="0" * 64, n_records=1, label_names=None)
        session.add(corpus)
        session.flush()
        job = jobs.create(session, type="pretrain", corpus_id=corpus.id, spec={"model": {"preset": "nano"}}, seed=1,
                          total_steps=10)
        session.add(Checkpoint(job_id=job.id, step=5, path="checkpoints/x", size_bytes=1, task="lm",
                               model_config={"n_layer": 2}, tokenizer_type="gpt2", metrics={"val_loss": 3.0}))
        session.add(Metric(job_id=job.id, step=1, name="train_loss", value=9.5))
        job_id = job.id
    with database.session() as session:
        job = session.get(Job, job_id)
        assert job.created_at.tzinfo is not None and job.created_at <= utcnow()
        assert job.spec == {"model": {"preset": "nano"}} and job.status == "queued"
        assert session.scalars(select(Checkpoint)).one().metrics == {"val_loss": 3.0}
    database.dispose()


def test_sqlite_migrations_keep_child_rows(tmp_path):
    """A batch migration on SQLite rebuilds tables; with foreign keys on it would cascade-delete children."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    database = Database(url)
    with database.session() as session:
        corpus = Corpus(name="c", kind="text", filename="c.txt", format="txt", size_bytes=1, sha256="0" * 64,
                        n_records=1)
        session.add(corpus)
        session.flush()
        jobs.create(session, type="pretrain", corpus_id=corpus.id, spec={}, seed=1, total_steps=1)
    downgrade(url, "base")
    upgrade(url)  # rebuilds jobs in batch mode on the way up; the tables are empty again, but nothing broke
    with database.engine.connect() as connection:
        assert connection.execute(text("PRAGMA foreign_key_check")).fetchall() == []
    database.dispose()
