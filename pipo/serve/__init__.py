"""`pipo serve`: PIPO (and regular / mtp / eagle) decoding behind the OpenAI HTTP API."""
