"""Training from a flow: the task that launches DeepSpeed (the training itself is
distillflow.training, the top-level folder training/).

- student.py: `train-student`, the launcher, its progress and artifacts;
- demo_teacher.py: the demo teacher (shipped, or trained again when stale).

May import: tasks/artifact_charts.py and the layers below tasks/. `distillflow.tasks.train`
is this folder, tasks/train/, while distillflow/ is another folder.
"""
