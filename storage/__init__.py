"""Storage: datasets on disk (Parquet shards, rejects, cards, manifests, versions), the
teacher-call ledger, seed readers, the top-k logprob codec and `distill inspect`."""
