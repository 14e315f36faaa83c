"""The application layer: programs built on top of a model rather than inside its training.

`llm` is the one LLM interface they code against (gptlab's engine in process, or any OpenAI-compatible
server); `models` fetches real pretrained models into a local cache (`gptlab models`).
"""
