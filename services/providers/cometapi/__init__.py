"""CometAPI: the HTTP client (client.py, the entry point, and its parts) and CometAPI as a provider (provider.py)."""
