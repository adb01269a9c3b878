"""The local engine: the provider (provider.py), its one-at-a-time queue (queue.py) and diffusers + peft (engine/)."""
