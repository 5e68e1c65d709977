"""Text in, vectors out (internal): the llama.cpp engine (``engine``), the in-process
``Embedder`` (``embedder``), the engine child process (``worker``), the child environment
(``children``) and the engine-work model (``workload``). ``Embedder``, ``EmbedderConfig``,
``Embeddings`` and ``ProcessEmbedder`` are public through ``edge_agent``.
"""
