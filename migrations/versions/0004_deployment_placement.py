"""deployments.device and deployments.dtype: where a deployment is served, `auto` resolved by each API process

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('device', sa.String(length=16), nullable=False, server_default='auto'))
        batch_op.add_column(sa.Column('dtype', sa.String(length=16), nullable=False, server_default='auto'))


def downgrade() -> None:
    with op.batch_alter_table('deployments', schema=None) as batch_op:
        batch_op.drop_column('dtype')
        batch_op.drop_column('device')
