"""What makes a stage fast on a GPU, set on a model from outside: ``skinny_matmul`` (decode's
weight-streaming products, tuned per shape), ``decode_attention`` (flash decoding against the KV cache),
``cuda_graphs`` (warm-up, the compiled layer and the captured decode step), ``compile_cache`` (their
on-disk caches, keyed by what makes them valid) and ``side_stream`` (warming up off the default
stream)."""
