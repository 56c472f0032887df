"""Versioned schema changes, applied by ``BatchInfer.migrate()`` through alembic."""
