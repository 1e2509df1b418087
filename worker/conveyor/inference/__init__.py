"""Generation with a pipeline of stages. A reading order:

1. ``model/``: a stage's slice of a HF model (families, loader, KV cache, the stage model, encoders).
2. ``kernels/``: the GPU paths set on that model from outside (products, decode attention, CUDA graphs,
   the compile cache).
3. ``pipeline/``: the generation loop across stages (requests and their queues, scheduler, stage
   worker, p2p, sampling, tensor parallel, quantization, the offline schedule check).
4. The entry points, here: ``rank_builder`` (the one way a generation rank is built and warmed up),
   ``job`` (a batch job), ``serve``, ``openai_api`` and ``openai_requests`` (serve mode), ``cli``
   (``conveyor generate``), ``validate`` (pre-flight checks), ``progress`` and ``run_progress``.
"""
