"""``edgeadapt serve``: an OpenAI-compatible server for one base and its adapters (needs the ``serve`` extra)."""
