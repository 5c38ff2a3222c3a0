"""Disk: per-session directories with leases, disk reservations and the cleanup policy that
removes old, failed and (under disk pressure) idle sessions without leaving the session root."""
