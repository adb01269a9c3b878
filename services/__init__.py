"""Everything that does work. Nothing in this package imports gradio."""
