"""Commands run by hand (make deploy), outside the app's request path."""
