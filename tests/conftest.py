"""Fixtures of every layer of the suite, and the layers themselves.

    tests/unit/         the model library, the engine, the command line, the deployment files: no server at all
    tests/api/          the HTTP API in process, on SQLite databases copied from one migrated template
    tests/integration/  PostgreSQL and Redis: migrations, the job lifecycle, the whole flow with real workers

Each test is marked with its layer (`pytest -m unit`, `-m "api and not integration"`, `-m integration`).
A test that asks for a database runs on SQLite; in the integration layer, or marked `both_databases`, it runs
on PostgreSQL too, and that run belongs to the integration layer.
"""

import os
import secrets
import shutil
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
LAYERS = ("unit", "api", "integration")
DATABASES = ("sqlite", "postgresql")

if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))

# under pytest-xdist each process gets its share of the cores
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1)))))

POSTGRES_ADMIN_URL = os.environ.get("SCRATCHLLM_TEST_POSTGRES_URL",
                                    "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def pytest_configure(config):
    for layer in LAYERS:
        config.addinivalue_line("markers", f"{layer}: a test of the {layer} layer (tests/{layer})")
    config.addinivalue_line("markers", "both_databases: run on PostgreSQL too (in the integration layer)")


def pytest_generate_tests(metafunc):
    if "database_kind" in metafunc.fixturenames:
        in_integration = TESTS / "integration" in Path(str(metafunc.definition.fspath)).parents
        both = in_integration or metafunc.definition.get_closest_marker("both_databases")
        kinds = DATABASES if both else DATABASES[:1]
        metafunc.parametrize("database_kind", kinds, ids=kinds)


def pytest_collection_modifyitems(items):
    for item in items:
        layer = Path(str(item.fspath)).relative_to(TESTS).parts[0]
        if layer in LAYERS:
            item.add_marker(layer)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("database_kind") == "postgresql":
            item.add_marker("integration")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip("../shared/data is not beside the repository")
    return DATA


@pytest.fixture
def lm():
    """A tiny untrained GPT on GPT-2's tokenizer, the same for every test."""
    from model import GPT
    from tests.helpers import TINY_LM

    torch.manual_seed(0)
    return GPT(TINY_LM).eval()


# -- databases ---------------------------------------------------------------------------------------------

def _postgres_admin():
    from sqlalchemy import create_engine

    return create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")


def _postgres_database(template: str | None = None) -> str:
    from sqlalchemy import text

    name = f"scratchllm_test_{secrets.token_hex(4)}"
    admin = _postgres_admin()
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else "")))
    admin.dispose()
    return name


def _drop_postgres_database(name: str) -> None:
    from sqlalchemy import text

    admin = _postgres_admin()
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _postgres_url(name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def postgres_url():
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    name = _postgres_database()
    try:
        yield _postgres_url(name)
    finally:
        _drop_postgres_database(name)


@pytest.fixture
def database_kind() -> str:
    return DATABASES[0]  # parametrized by pytest_generate_tests


@pytest.fixture
def database_url(request, database_kind, tmp_path):
    """An empty database: an SQLite file, or a fresh PostgreSQL database."""
    if database_kind == "sqlite":
        return f"sqlite:///{tmp_path / 'scratchllm.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> Path:
    from core.migrate import upgrade

    path = tmp_path_factory.mktemp("template") / "scratchllm.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_template():
    from core.migrate import upgrade

    name = _postgres_database()
    upgrade(_postgres_url(name))
    yield name
    _drop_postgres_database(name)


def _migrated_copy(request, database_kind: str, directory: Path) -> str:
    """A database at the latest migration, copied from a template migrated once per session; a PostgreSQL one
    is dropped when the request's scope ends."""
    if database_kind == "sqlite":
        template = request.getfixturevalue("sqlite_template")
        for file in template.parent.glob(template.name + "*"):  # with a WAL file, should one be left
            shutil.copy(file, directory / file.name)
        return f"sqlite:///{directory / template.name}"
    name = _postgres_database(template=request.getfixturevalue("postgres_template"))
    request.addfinalizer(lambda: _drop_postgres_database(name))
    return _postgres_url(name)


@pytest.fixture
def migrated_database_url(request, database_kind, tmp_path):
    return _migrated_copy(request, database_kind, tmp_path)


@pytest.fixture(scope="module")
def module_databases(request, tmp_path_factory):
    """database kind -> the URL of one migrated database for the whole module (in each test process), for tests
    that look only at their own rows: making a PostgreSQL database per test costs a fraction of a second."""
    made: dict[str, str] = {}

    def database_url(kind: str) -> str:
        if kind not in made:
            made[kind] = _migrated_copy(request, kind, tmp_path_factory.mktemp("module_database"))
        return made[kind]

    return database_url


# -- the service -------------------------------------------------------------------------------------------

@pytest.fixture
def api(migrated_database_url, tmp_path):
    """A TestClient of the service without keys, as its one local user, on a migrated database and a fresh
    data dir."""
    from app.main import create_app
    from core.settings import Settings
    from tests.helpers import local_client

    settings = Settings(data_dir=tmp_path / "data", database_url=migrated_database_url, max_upload_bytes=2_000_000,
                        api_keys_required=False)
    with local_client(create_app(settings)) as client:
        yield client


@pytest.fixture
def live_server(api):
    """The `api` fixture's application served by uvicorn on a free local port, for real HTTP clients."""
    from tests.helpers import serving

    with serving(api.app) as url:
        yield url
