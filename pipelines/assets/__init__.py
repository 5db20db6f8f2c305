"""Assets by domain: extraction (tokens, activations and their checks), statistics."""
