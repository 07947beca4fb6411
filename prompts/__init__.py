"""Prompt generation: seeds → edge cases, adversarial perturbations, teacher-driven rewrites.

`generate_prompts` is the one entry point; it imports no orchestrator, so any flow (or a
plain script) can call it.

Where a module lives: `distillflow.tasks.teacher` is the folder tasks/teacher/, while
distillflow/ is another folder; pyproject.toml maps each `distillflow.X` package to the
top-level folder X/; distillflow/ itself holds the CLI, the config and the core modules.
"""

from distillflow.prompts.diversity import prompt_diversity_summary
from distillflow.prompts.generate import generate_prompts
from distillflow.prompts.report import report_markdown, report_table
from distillflow.prompts.teacher_driven import CompleteFn

__all__ = [
    "CompleteFn",
    "generate_prompts",
    "prompt_diversity_summary",
    "report_markdown",
    "report_table",
]
