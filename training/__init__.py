"""Training: the student model, data loading and packing, distillation losses and the
DeepSpeed training loop (run as its own process by `distill train`)."""
