"""Storage: datasets on disk (Parquet shards, rejects, cards, manifests, versions), the
teacher-call ledger, seed readers, the top-k logprob codec and `distill inspect`.

Where a module lives: `distillflow.tasks.teacher` is the folder tasks/teacher/, while
distillflow/ is another folder; pyproject.toml maps each `distillflow.X` package to the
top-level folder X/; distillflow/ itself holds the CLI, the config and the core modules.
"""
