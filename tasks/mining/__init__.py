"""`distill mine`: the prompts a student gets most wrong, answered once, added as a new
dataset version.

- steps.py: candidates, scores, selection, the new version;
- config.py: the `mining:` section.

May import: tasks/teacher/, tasks/filters/, tasks/evaluation/ and the layers below tasks/.
`distillflow.tasks.mining` is this folder, tasks/mining/, while distillflow/ is another folder.
"""
