"""Drop-in Mixture-of-Experts layers and training plugins for Hugging Face models."""

__all__: list[str] = []
