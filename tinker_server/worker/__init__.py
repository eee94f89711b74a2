"""The worker process: owns the torch model and every LoRA adapter of one base model."""
