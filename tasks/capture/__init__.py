"""`distill capture-logits`: the teacher's distribution at every answer token, into the
dataset (top-k, or k tokens drawn from it).

- logits.py: the capture (in process or from a vLLM server), shard by shard, resumable;
- sampling.py: the sampled capture's draws and their weights;
- config.py: the `capture:` section.

May import: the layers below tasks/ only. `distillflow.tasks.capture` is this folder,
tasks/capture/, while distillflow/ is another folder.
"""
