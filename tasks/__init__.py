"""Tasks: the steps of the pipeline (teacher clients, filters, dedup, logit capture, the
training launcher, evaluation, sweep and mining) and their Prefect task wrappers."""
