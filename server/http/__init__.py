"""The OpenAI-compatible HTTP front end (FastAPI, uvicorn). Imported only by the serve path."""
