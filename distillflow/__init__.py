"""distillflow: teacher LLM → Parquet datasets → DeepSpeed-trained student.

Where a module lives: `distillflow.tasks.teacher` is the folder tasks/teacher/, while
distillflow/ is another folder; pyproject.toml maps each `distillflow.X` package to the
top-level folder X/; distillflow/ itself holds the CLI, the config and the core modules.
"""

__version__ = "0.1.0"
