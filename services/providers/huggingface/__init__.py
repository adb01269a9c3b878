"""Hugging Face: training on HF Jobs, generating through Inference Providers."""
