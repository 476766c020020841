"""Applying the Alembic migrations from code: `scratchllm db upgrade`, `scratchllm up` and the tests."""

from importlib.util import find_spec

from alembic import command
from alembic.config import Config


def alembic_config(database_url: str) -> Config:
    config = Config()
    # located, not imported: the migrations import the tables, so importing them here would be a cycle
    config.set_main_option("script_location", find_spec("migrations").submodule_search_locations[0])
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)
