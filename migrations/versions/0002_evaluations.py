"""evaluations: the results of evaluate jobs and their scored examples

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import core.db

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('evaluations',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('job_id', sa.String(length=40), nullable=False),
    sa.Column('checkpoint_id', sa.String(length=40), nullable=True),
    sa.Column('corpus_id', sa.String(length=40), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.Column('metrics', sa.JSON(), nullable=True),
    sa.Column('details', sa.JSON(), nullable=True),
    sa.Column('created_at', core.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('finished_at', core.db.UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['checkpoint_id'], ['checkpoints.id'],
                            name=op.f('fk_evaluations_checkpoint_id_checkpoints'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['corpus_id'], ['corpora.id'],
                            name=op.f('fk_evaluations_corpus_id_corpora'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_evaluations_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_evaluations')),
    sa.UniqueConstraint('job_id', name=op.f('uq_evaluations_job_id'))
    )
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_evaluations_checkpoint_id'), ['checkpoint_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluations_corpus_id'), ['corpus_id'], unique=False)

    op.create_table('evaluation_examples',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('evaluation_id', sa.String(length=40), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['evaluation_id'], ['evaluations.id'],
                            name=op.f('fk_evaluation_examples_evaluation_id_evaluations'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_evaluation_examples')),
    sa.UniqueConstraint('evaluation_id', 'position', name='uq_evaluation_examples_position')
    )
    with op.batch_alter_table('evaluation_examples', schema=None) as batch_op:
        batch_op.create_index('ix_evaluation_examples_score', ['evaluation_id', 'score'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('evaluation_examples', schema=None) as batch_op:
        batch_op.drop_index('ix_evaluation_examples_score')

    op.drop_table('evaluation_examples')
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_evaluations_corpus_id'))
        batch_op.drop_index(batch_op.f('ix_evaluations_checkpoint_id'))

    op.drop_table('evaluations')
