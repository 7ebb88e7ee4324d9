"""Side-by-side benchmarks of every method against PEFT: ``python -m experiments.benchmarks.run``."""
