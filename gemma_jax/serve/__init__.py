"""`gemma-jax serve`: an OpenAI-compatible HTTP server on the continuous-batching engine.

`app` holds the routes and wire format, `scheduler` the engine thread, `metrics` the
Prometheus metrics, `server` start-up, multi-host roles and shutdown.
"""
