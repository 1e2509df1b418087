"""Write ./tiny-llama: a randomly initialised Llama with the shapes of a real one, only tiny, so that
tiny-cpu-inference.yaml runs on a laptop CPU in seconds. Offline: no hub download.

    python deploy/examples/make-tiny-llama.py [OUTPUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "tiny-llama"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,  # two stages x two layers
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
