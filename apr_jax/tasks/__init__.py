"""Tasks: problem generators, solvers that write training trajectories, verifiers."""
