"""Data out: candles and replay for strategies, trades, information bars, export, charts, coverage."""
