"""Serving: the server-side tool loop and the OpenAI-compatible FastAPI app around it."""
