"""Fault-injection suite (issue #5): a Jepsen-style checker, the harness that drives the real
pipeline processes through faults, and the reduced CI run (``test_faults.py``).
The large run is ``scripts/faults.py``; how to reproduce it is in ``docs/faults.md``."""
