"""`umbrella serve`: the model over HTTP with a viewer page (FastAPI app in :mod:`.app`)."""
