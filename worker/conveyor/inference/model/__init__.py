"""A pipeline stage's slice of a HF model for generation, with no kernel or compile flag inside it:
``families`` (what a HF config says about its architecture), ``loader`` (only this stage's tensors from
the safetensors), ``kv_cache`` (a stage's preallocated cache), ``stage_model`` (the layers, their
attention and the decode-kernel hooks the entry points set from outside) and ``encoder`` (BERT-like
embedding models)."""
