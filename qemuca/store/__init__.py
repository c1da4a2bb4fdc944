"""The CA home on disk: the SQLite index and audit log, its crash journal, and doctor."""
