"""The AUTOMATIC1111-compatible HTTP API: a second front on the same backend contract."""
