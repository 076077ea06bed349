"""t5adapt orchestrator: configuration, command line and (later) run control."""
