"""Memory planner: the peak device memory of a training run, estimated before starting it.

Import from `slimtune.plan.estimate`, the front door (model shapes, method states, activations, strategies, units).
"""
