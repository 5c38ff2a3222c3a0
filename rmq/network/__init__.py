"""Network: cluster-wide rate and concurrency limits kept in Redis, and the HTTP clients that obey them.

Limits: ``rate_limiter`` (sliding-window logs), ``semaphore`` (permits that are leases), ``lease_keeper``
(renews a process's leases), ``redis_scripts`` (how their Lua runs, on Redis's clock); ``throttle``
(``rmq.throttle()``); the task concerns ``rate_limit_guard`` and ``concurrency_guard``. HTTP:
``http_registry`` (``client()``, one named client per process), ``http_client`` (``RmqHttpClient``),
``retries`` (also the defaults of ``network=True`` tasks) and ``wire_bytes``. See docs/design.md#rate-limits
and docs/design.md#http.
"""
