"""The model server's feedback store: served completions, their choices, and users' feedback (rlhf/serve_store.py).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "served_completions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("messages", sa.Text(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("single_turn", sa.Boolean(), nullable=False),
        sa.Column("temperature", sa.Float(), nullable=False),
        sa.Column("top_p", sa.Float(), nullable=False),
        sa.Column("max_tokens", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("api_key_id", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_served_completions_model_version", "served_completions", ["model_version"])
    op.create_index("ix_served_completions_created_at", "served_completions", ["created_at"])
    op.create_table(
        "served_choices",
        sa.Column("completion_id", sa.String(64), sa.ForeignKey("served_completions.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("index", sa.Integer(), primary_key=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("finish_reason", sa.String(16), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
    )
    op.create_table(
        "served_feedback",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("completion_id", sa.String(64), sa.ForeignKey("served_completions.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("choice_index", sa.Integer(), nullable=True),
        sa.Column("rating", sa.String(8), nullable=True),
        sa.Column("preferred", sa.String(8), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_served_feedback_completion_id", "served_feedback", ["completion_id"])
    op.create_index("ix_served_feedback_created_at", "served_feedback", ["created_at"])


def downgrade() -> None:
    for table in ("served_feedback", "served_choices", "served_completions"):
        op.drop_table(table)
