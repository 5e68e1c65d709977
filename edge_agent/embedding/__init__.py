"""Text in, vectors out (internal): the llama.cpp engine (``engine``), the numpy-free work
around it (``inference``: validate, tokenise, chunk, batch), the in-process ``Embedder`` and
the numpy finishing of vectors (``embedder``), the engine child's program (``child``) and its
parent-side handle (``worker``: ``ProcessEmbedder``), the child environment (``children``) and
the engine-work model (``workload``). ``Embedder``, ``EmbedderConfig``, ``Embeddings`` and
``ProcessEmbedder`` are public through ``edge_agent``.
"""
