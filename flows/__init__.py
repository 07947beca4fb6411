"""Prefect flows: each wires the tasks of one command (build, dedup, capture-logits, train,
eval, sweep, mine, run, demo) and owns no logic of its own."""

from distillflow.failures import quiet_run_failure_reports

quiet_run_failure_reports()  # a run that fails with the project's own error logs its paragraph once
