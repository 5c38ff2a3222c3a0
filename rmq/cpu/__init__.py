"""CPU: the worker's CPU slots, reserved by ``cpu=N`` tasks, and native thread pools capped to
them while a task runs."""
