"""Persistence: what each stage reads and writes, one transaction per batch (see ``pipeline.db``)."""
