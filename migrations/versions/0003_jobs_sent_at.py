"""jobs.sent_at: when a queued job was last sent to the broker, so the reaper can send again a lost message

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.db

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sent_at', core.db.UTCDateTime(timezone=True), nullable=True))
    # the jobs queued now were sent when they were created, as far as anyone knows
    op.execute("UPDATE jobs SET sent_at = created_at WHERE status = 'queued'")


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('sent_at')
