"""Memory: the budget and how the worker is measured, admission of tasks against it, the
pressure ladder the governor climbs, learned peaks and hygiene between tasks."""
