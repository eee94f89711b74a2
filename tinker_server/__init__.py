"""tinker_server: a self-hostable LoRA fine-tuning service with a gRPC API."""
