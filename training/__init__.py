"""Training: the student model, data loading and packing, distillation losses and the
DeepSpeed training loop (run as its own process by `distill train`).

Where a module lives: `distillflow.tasks.teacher` is the folder tasks/teacher/, while
distillflow/ is another folder; pyproject.toml maps each `distillflow.X` package to the
top-level folder X/; distillflow/ itself holds the CLI, the config and the core modules.
"""
