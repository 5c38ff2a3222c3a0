"""Disk: per-session working directories held by leases, and the cleanup that removes old, failed
and (under disk pressure) idle sessions without ever leaving the session root.

From the bottom up: ``safe_tree`` (remove and measure a tree, never following a link),
``session_ids``, ``root_lock`` (the root's removal lock, fork-safe), ``session_root`` (the layout
under the root: leases, failure marks, the trash), ``sessions`` (a session around a task: the store
and the concern), ``cleanup_policy`` (pure: what to remove and why) and ``cleanup`` (reads the root,
applies the policy, reports). See ``docs/design.md#sessions``.
"""
