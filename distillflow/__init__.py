"""distillflow: teacher LLM → Parquet datasets → DeepSpeed-trained student."""

__version__ = "0.1.0"
