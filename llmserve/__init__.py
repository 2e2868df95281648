"""llmserve: open language models behind the OpenAI HTTP API."""

__version__ = "0.1.0"
