"""Alembic migrations of ScratchLLM's database (run them with `scratchllm db upgrade`)."""
