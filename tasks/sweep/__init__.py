"""`distill sweep`: a grid of training settings, each point trained and evaluated, ranked.

- plan.py: the points, their state on disk, reuse and ranking;
- config.py: the `sweep:` section.

May import: tasks/evaluation/ and the layers below tasks/. `distillflow.tasks.sweep` is this
folder, tasks/sweep/, while distillflow/ is another folder.
"""
