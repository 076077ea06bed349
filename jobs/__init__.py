"""t5adapt jobs: the stages of a run (adapt, and later prepare, train, evaluate, export)."""
