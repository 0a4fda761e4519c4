"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-12-04 20:02:18.185828
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op



revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table('batches',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=300), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('protocol_id', sa.String(length=200), nullable=False),
    sa.Column('protocol_hash', sa.String(length=64), nullable=False),
    sa.Column('protocol', sa.JSON(), nullable=False),
    sa.Column('endpoint', sa.String(length=500), nullable=False),
    sa.Column('is_demo', sa.Boolean(), nullable=False),
    sa.Column('budget_usd', sa.Float(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('hermitkit_version', sa.String(length=40), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('models',
    sa.Column('endpoint', sa.String(length=500), nullable=False),
    sa.Column('model_id', sa.String(length=300), nullable=False),
    sa.Column('name', sa.String(length=500), nullable=False),
    sa.Column('context_length', sa.Integer(), nullable=True),
    sa.Column('prompt_price', sa.Float(), nullable=True),
    sa.Column('completion_price', sa.Float(), nullable=True),
    sa.Column('is_demo', sa.Boolean(), nullable=False),
    sa.Column('supports_structured_output', sa.Boolean(), nullable=False),
    sa.Column('raw', sa.JSON(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('endpoint', 'model_id')
    )
    op.create_table('personas',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('batch_id', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=300), nullable=False),
    sa.Column('judge_model', sa.String(length=300), nullable=False),
    sa.Column('archetype', sa.String(length=100), nullable=False),
    sa.Column('stats', sa.JSON(), nullable=False),
    sa.Column('themes', sa.JSON(), nullable=True),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('evidence', sa.JSON(), nullable=True),
    sa.Column('raw_reply', sa.Text(), nullable=True),
    sa.Column('cost_usd', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('personas', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_personas_batch_id'), ['batch_id'], unique=False)

    op.create_table('reports',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('batch_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('reports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reports_batch_id'), ['batch_id'], unique=False)

    op.create_table('runs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('batch_id', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=300), nullable=False),
    sa.Column('repetition', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('protocol_id', sa.String(length=200), nullable=False),
    sa.Column('protocol_hash', sa.String(length=64), nullable=False),
    sa.Column('turns_target', sa.Integer(), nullable=False),
    sa.Column('turn_count', sa.Integer(), nullable=False),
    sa.Column('ok_count', sa.Integer(), nullable=False),
    sa.Column('multiple_count', sa.Integer(), nullable=False),
    sa.Column('unbalanced_count', sa.Integer(), nullable=False),
    sa.Column('empty_count', sa.Integer(), nullable=False),
    sa.Column('missing_count', sa.Integer(), nullable=False),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('completion_tokens', sa.Integer(), nullable=False),
    sa.Column('reasoning_tokens', sa.Integer(), nullable=False),
    sa.Column('cost_usd', sa.Float(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('batch_id', 'model', 'repetition', name='uq_runs_batch_model_repetition')
    )
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_runs_batch_id'), ['batch_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_runs_model'), ['model'], unique=False)

    op.create_table('syntheses',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('batch_id', sa.Integer(), nullable=False),
    sa.Column('model', sa.String(length=300), nullable=False),
    sa.Column('judge_model', sa.String(length=300), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('themes', sa.JSON(), nullable=True),
    sa.Column('raw_reply', sa.Text(), nullable=True),
    sa.Column('cost_usd', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('syntheses', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_syntheses_batch_id'), ['batch_id'], unique=False)

    op.create_table('judgements',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('judge_model', sa.String(length=300), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('mirror_test', sa.String(length=32), nullable=True),
    sa.Column('self_awareness', sa.String(length=32), nullable=True),
    sa.Column('refusal', sa.Boolean(), nullable=True),
    sa.Column('topics', sa.JSON(), nullable=True),
    sa.Column('topic_summary', sa.Text(), nullable=True),
    sa.Column('exploration_style', sa.String(length=32), nullable=True),
    sa.Column('sophistication', sa.Integer(), nullable=True),
    sa.Column('autonomy', sa.Integer(), nullable=True),
    sa.Column('emergent_behaviour', sa.Text(), nullable=True),
    sa.Column('context_loss', sa.Boolean(), nullable=True),
    sa.Column('analysis', sa.Text(), nullable=True),
    sa.Column('raw_reply', sa.Text(), nullable=True),
    sa.Column('retry_reply', sa.Text(), nullable=True),
    sa.Column('repair_reply', sa.Text(), nullable=True),
    sa.Column('failure_reason', sa.String(length=64), nullable=True),
    sa.Column('failure_detail', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('truncated', sa.Boolean(), nullable=False),
    sa.Column('sampling', sa.JSON(), nullable=False),
    sa.Column('prompt_version', sa.String(length=64), nullable=False),
    sa.Column('prompt_tokens', sa.Integer(), nullable=True),
    sa.Column('completion_tokens', sa.Integer(), nullable=True),
    sa.Column('cost_usd', sa.Float(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_id', 'judge_model', 'round', name='uq_judgements_run_judge_round')
    )
    with op.batch_alter_table('judgements', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_judgements_run_id'), ['run_id'], unique=False)

    op.create_table('turns',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('idx', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('content', sa.Text(), nullable=True),
    sa.Column('reasoning', sa.Text(), nullable=True),
    sa.Column('turn_number', sa.Integer(), nullable=True),
    sa.Column('verdict', sa.String(length=16), nullable=True),
    sa.Column('extracted', sa.Text(), nullable=True),
    sa.Column('finish_reason', sa.String(length=64), nullable=True),
    sa.Column('prompt_tokens', sa.Integer(), nullable=True),
    sa.Column('completion_tokens', sa.Integer(), nullable=True),
    sa.Column('reasoning_tokens', sa.Integer(), nullable=True),
    sa.Column('cost_usd', sa.Float(), nullable=True),
    sa.Column('latency_s', sa.Float(), nullable=True),
    sa.Column('generation_id', sa.String(length=200), nullable=True),
    sa.Column('provider', sa.String(length=200), nullable=True),
    sa.Column('served_model', sa.String(length=300), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_id', 'idx', name='uq_turns_run_idx')
    )
    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.create_index('ix_turns_run_role', ['run_id', 'role'], unique=False)




def downgrade() -> None:

    with op.batch_alter_table('turns', schema=None) as batch_op:
        batch_op.drop_index('ix_turns_run_role')

    op.drop_table('turns')
    with op.batch_alter_table('judgements', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_judgements_run_id'))

    op.drop_table('judgements')
    with op.batch_alter_table('syntheses', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_syntheses_batch_id'))

    op.drop_table('syntheses')
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_runs_model'))
        batch_op.drop_index(batch_op.f('ix_runs_batch_id'))

    op.drop_table('runs')
    with op.batch_alter_table('reports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reports_batch_id'))

    op.drop_table('reports')
    with op.batch_alter_table('personas', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_personas_batch_id'))

    op.drop_table('personas')
    op.drop_table('models')
    op.drop_table('batches')

