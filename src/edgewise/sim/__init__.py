"""Fleet simulation: many agents as processes, for the demo, tests and benchmarks."""
