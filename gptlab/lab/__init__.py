"""The lab: measurements behind the field's intuitions (word2vec, the LLM as a compressor, views into a model,
scaling laws, in-context learning and emergence), each a `gptlab lab ...` command that writes a table and
a plot. It sits on the top floor beside serve/ and apps/ and may use everything below."""
