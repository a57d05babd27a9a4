"""PostgreSQL/TimescaleDB: connections, schema and migrations, the embedded server, the writer, aggregate refresh."""
