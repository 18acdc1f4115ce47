"""Import GGUF files (llama.cpp's format, as Ollama and LM Studio keep them) as MLX model dirs.

reader opens a file or a split set and checks it; config turns its metadata into config.json;
tensors maps and repacks each tensor into MLX's layout; convert writes the model directory
atomically with bounded memory; `python -m exod.models.gguf SRC DEST` is the subprocess that exod
supervises. Nothing is imported here, so that the daemon may import a light sibling (the Ollama
store reader) without paying for numpy and gguf.
"""
