"""Who trains and generates: the Provider protocol (base.py), CometAPI (cometapi/) and the local engine (local/)."""
