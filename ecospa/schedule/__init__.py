"""Algorithm 1: PlanConfig and the planner that picks each round's units until the target size."""
