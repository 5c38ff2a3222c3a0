"""What every other part of rmq stands on, with no Celery in it: configuration, units, errors,
Redis keys, fork safety, the per-worker runtime, the shared ledger, per-process counters, task
declarations, run claims and message routing."""
