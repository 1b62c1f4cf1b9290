"""Data quality: the Great Expectations suites that gate a dataset before annotation/training."""
