"""Gradio UI: one module per tab. Handlers are plain functions over services."""
