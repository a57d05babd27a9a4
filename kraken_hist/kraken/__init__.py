"""Talking to Kraken: REST and WebSocket clients, their wire parsing, and the shared REST rate limiter."""
