"""Training: LoRA supervised fine-tuning of causal LMs (and, later, image classifiers)."""
