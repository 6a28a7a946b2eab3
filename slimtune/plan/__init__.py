"""Memory planner: the peak device memory of a training run, estimated before starting it.

- `slimtune.plan.estimate`: the front door to the formulas (model shapes, method states, activations, strategies,
  units, framework baseline).
- `slimtune.plan.settings`: `RunSettings`, what a method's and a strategy's ``estimate_memory`` receive.
- `slimtune.plan.run`: the plan of a training run (logged before step 1, checked against the measured peak).
- `slimtune.plan.cli`: the ``slimtune estimate`` verb.
"""
