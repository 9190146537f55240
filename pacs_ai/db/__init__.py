"""Database: models, engine/session set-up, migrations and audit queries."""
