"""The benchmarks of retina-trainer: run.py runs them; common.py holds what the sections share and each section
has its own module (throughput.py, memory.py, expand.py, pack.py). See README.md here."""
