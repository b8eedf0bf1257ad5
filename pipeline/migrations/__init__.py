"""Alembic migrations of the database schema, shipped inside the package (see ``pipeline.migrate``)."""
