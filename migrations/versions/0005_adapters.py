"""checkpoints.adapter_of_id and deployment_adapters: adapter-only LoRA checkpoints, served per request over their
base

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('adapter_of_id', sa.String(length=40), nullable=True))
        batch_op.create_index(batch_op.f('ix_checkpoints_adapter_of_id'), ['adapter_of_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_checkpoints_adapter_of_id_checkpoints'), 'checkpoints',
                                    ['adapter_of_id'], ['id'], ondelete='RESTRICT')

    op.create_table('deployment_adapters',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('deployment_id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('checkpoint_id', sa.String(length=40), nullable=False),
    sa.ForeignKeyConstraint(['checkpoint_id'], ['checkpoints.id'],
                            name=op.f('fk_deployment_adapters_checkpoint_id_checkpoints'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['deployment_id'], ['deployments.id'],
                            name=op.f('fk_deployment_adapters_deployment_id_deployments'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_deployment_adapters')),
    sa.UniqueConstraint('deployment_id', 'name', name='uq_deployment_adapters_name')
    )
    with op.batch_alter_table('deployment_adapters', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deployment_adapters_checkpoint_id'), ['checkpoint_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('deployment_adapters', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deployment_adapters_checkpoint_id'))
    op.drop_table('deployment_adapters')
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_checkpoints_adapter_of_id_checkpoints'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_checkpoints_adapter_of_id'))
        batch_op.drop_column('adapter_of_id')
