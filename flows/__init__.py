"""Prefect flows: each wires the tasks of one command (build, dedup, capture-logits, train,
eval, sweep, mine, run, demo) and owns no logic of its own."""
