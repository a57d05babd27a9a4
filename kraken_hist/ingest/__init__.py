"""The ways data comes in: REST backfill, the live stream, and Kraken's downloadable archives."""
