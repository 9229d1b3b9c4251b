"""Storage: the backend interface, SQLite, PostgreSQL, sealing, policy storage, storage errors."""
