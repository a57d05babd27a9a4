"""The market-data rules, each defined once: Kraken's candle, bucket aggregation, time ranges, back-off (pure Python and named SQL)."""
