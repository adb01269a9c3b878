"""CometAPI: the HTTP client (client.py) and CometAPI as a provider (provider.py)."""
