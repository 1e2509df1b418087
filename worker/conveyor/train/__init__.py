"""Train mode's built-in fine-tuning of HF causal LMs. Reading order: finetune.py (one rank's run, top to
bottom), hf_layers.py (the model as pipeline layers, loaded per stage), data.py (samples and their
order), export.py (back to a plain HF directory), progress.py (tokens/s and MFU)."""
