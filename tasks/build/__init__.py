"""The build's steps: the Prefect tasks of `distill build` and its teacher stage.

- steps.py: the build's tasks (seeds, prompts, prompt filters, answer batches, shards, the
  dataset's finish) and the manifest's parts;
- teacher_stage.py: the teacher stage, one contract (`answer(plan, stage_seconds)`) with its
  implementations (batches in this process; shards on Dask workers or a work pool);
- shards.py: the build in shards (plan, state, resume, one shard's answers);
- shard_writer.py: the process that filters and writes shards off the request loop;
- shard_pool.py: shards as flow runs on a Prefect work pool;
- cost_estimate.py: `distill build --dry-run` (prompts, tokens, cost).

May import: tasks/teacher/, tasks/filters/, tasks/child.py, and the layers below tasks/
(prompts, training, storage, the core). `distillflow.tasks.build` is this folder,
tasks/build/, while distillflow/ is another folder.
"""
