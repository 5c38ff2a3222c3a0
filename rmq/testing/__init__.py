"""Support for running real governed workers as subprocesses (tests, benchmarks, the demo)."""
