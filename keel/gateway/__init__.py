"""Models and inference: the OpenAI-compatible API, providers, router and metering."""
