"""Tasks: the steps of the pipeline (the teacher in tasks/teacher/ and the build's teacher
stage, filters, dedup, logit capture, the training launcher, evaluation, sweep and mining)
and their Prefect task wrappers.

Where a module lives: `distillflow.tasks.teacher` is the folder tasks/teacher/, while
distillflow/ is another folder; pyproject.toml maps each `distillflow.X` package to the
top-level folder X/; distillflow/ itself holds the CLI, the config and the core modules.
"""
