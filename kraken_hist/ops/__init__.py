"""Running it as a service: job locks in Redis and Prometheus metrics."""
