"""Storage tests use the session-wide ``embedded_catalog`` and ``postgres_server``
fixtures of ``tests/conftest.py`` (one catalog and one PostgreSQL cluster per test run)."""
