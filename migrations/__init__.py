"""Alembic migrations of the Sceneprint database."""
