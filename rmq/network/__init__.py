"""Network: cluster-wide rate limits and concurrency permits kept in Redis, ``rmq.throttle()``,
pooled HTTP clients and the retry defaults of ``network=True`` tasks."""
