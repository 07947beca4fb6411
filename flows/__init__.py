"""Prefect flows: each wires the tasks of one command (build, dedup, capture-logits, train,
eval, sweep, mine, run, demo) and owns no logic of its own.

Where a module lives: `distillflow.tasks.teacher` is the folder tasks/teacher/, while
distillflow/ is another folder; pyproject.toml maps each `distillflow.X` package to the
top-level folder X/; distillflow/ itself holds the CLI, the config and the core modules.
"""

from distillflow.failures import quiet_run_failure_reports

quiet_run_failure_reports()  # a run that fails with the project's own error logs its paragraph once
