"""The vocabulary every layer shares: records, pairs, intervals, time, errors, settings, value bounds."""
