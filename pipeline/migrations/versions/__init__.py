"""Revision scripts (Alembic ignores this file)."""
