"""Serve one base model with many LoRA adapters in mixed batches from one paged memory pool."""

__all__: list[str] = []
