"""The database layer: engine, sessions and the column types both SQLite and PostgreSQL need."""

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import DateTime, Engine, MetaData, create_engine, event, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator

SQLITE_BUSY_TIMEOUT_S = 30


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """`prefix_` + 16 hex digits of the time in microseconds + 8 random ones: ids sort in creation order,
    which keeps `after`-cursor pagination stable."""
    return f"{prefix}_{time.time_ns() // 1000:016x}{secrets.token_hex(4)}"


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes; SQLite hands DateTime(timezone=True) back naive otherwise."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect):
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class database_now(FunctionElement):
    """The database server's clock plus seconds: the one clock that lease times are stamped and judged by,
    whatever the clocks of the API and worker machines say."""

    type = UTCDateTime()
    inherit_cache = True

    def __init__(self, seconds: float = 0.0):
        super().__init__(literal(float(seconds)))


@compiles(database_now)
def _postgresql_now(element, compiler, **kw) -> str:
    return f"CURRENT_TIMESTAMP + make_interval(secs => {compiler.process(element.clauses, **kw)})"


@compiles(database_now, "sqlite")
def _sqlite_now(element, compiler, **kw) -> str:
    # CURRENT_TIMESTAMP has whole seconds there, too coarse for sub-second heartbeats; this text (UTC, in
    # milliseconds) sorts correctly against the microsecond text SQLAlchemy stores for a DateTime
    return f"strftime('%Y-%m-%d %H:%M:%f', 'now', {compiler.process(element.clauses, **kw)} || ' seconds')"


class Base(DeclarativeBase):
    # named constraints: Alembic's batch mode on SQLite can only recreate constraints it can name
    metadata = MetaData(naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL and a long busy timeout: readers never block the writer, and concurrent writers (API and
    # worker processes) wait their turn instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
        engine = create_engine(url, connect_args=connect_args)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


class Database:
    """An engine and its session factory; one per process."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed when the block ends normally, rolled back when it raises."""
        with self.sessions() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()
