"""r1serve: an OpenAI-compatible server for DeepSeek-R1 family reasoning models."""

__version__ = "0.1.0"
