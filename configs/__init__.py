"""The default configs shipped with distillflow (package data: distillflow.configs); see
distillflow/resources.py and docs/configuration.md."""
