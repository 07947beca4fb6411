"""Tasks: the steps of the pipeline and their Prefect task wrappers, grouped by role.
Inside tasks/, a package imports only those to its left (the layering test checks it):

    child.py, artifact_charts.py  →  teacher/  →  filters/  →  build/, capture/, train/,
    evaluation/  →  mining/, sweep/  →  preflight.py

- teacher/: every way of asking a teacher, and the ledger in front of it;
- filters/: dedup, near-duplicates, quality, decontamination, diversity;
- build/: the tasks of `distill build` and its teacher stage;
- capture/: `distill capture-logits`;
- train/: the training launcher (the training itself is distillflow.training);
- evaluation/: `distill eval`;
- mining/, sweep/: `distill mine`, `distill sweep`;
- preflight.py: the checks of the world (files, models, servers) before a stage pays;
- child.py: how a helper process starts; artifact_charts.py: the charts of artifacts.

Where a module lives: `distillflow.tasks.teacher` is the folder tasks/teacher/, while
distillflow/ is another folder; pyproject.toml maps each `distillflow.X` package to the
top-level folder X/; distillflow/ itself holds the CLI, the config and the core modules.
"""
