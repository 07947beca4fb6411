"""`distill eval`: accuracy, robustness and speed of the teacher and its students.

- evaluate.py: the eval tasks (answers through the ledger, perturbations, timing);
- models.py: how each model answers (in process, a server, the teacher);
- checks.py: the answer checks (exact, one of, ROUGE-L, token F1);
- report.py: the report's table and its Markdown;
- config.py: the `evaluation:` section.

May import: tasks/teacher/, tasks/artifact_charts.py and the layers below tasks/.
`distillflow.tasks.evaluation` is this folder, tasks/evaluation/, while distillflow/ is
another folder.
"""
