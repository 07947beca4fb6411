"""The filters: what keeps a prompt or an answer out of a dataset, and why.

- passes.py: the prompt filters (once over the whole prompt set) and the response filters
  (per batch), with their reject reasons;
- dedup.py: exact keys and deterministic duplicate clusters;
- minhash.py (+ minhash_constants.py, minhash_kernels.py: numba, imported for large
  batches only): near-duplicates by MinHash and LSH, verified;
- semantic.py: embedding near-duplicates; quality.py: length, refusals, repetition;
  decontam.py: eval-set overlap; diversity.py: distinct-n and spread per strategy;
- dataset.py: `distill dedup`, the filters alone over an existing dataset;
- config.py: the `filters:` section.

May import: the layers below tasks/ only (no other part of tasks/). `distillflow.tasks.filters`
is this folder, tasks/filters/, while distillflow/ is another folder.
"""
