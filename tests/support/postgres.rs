//! Starts a real PostgreSQL for tests (being written).
