"""Write ./tiny-llama: a randomly initialised Llama with the shapes of a real one, only tiny, so that
tiny-cpu-inference.yaml runs on a laptop CPU in seconds. Offline: no hub download.

    python deploy/examples/make-tiny-llama.py [OUTPUT_DIR]

It is the checkpoint `conveyor run` builds for its built-in job (conveyor.testing.tiny.save_tiny): 4 layers
(two stages x two layers), seeded random weights, and a small tokenizer.
"""

from __future__ import annotations

import sys
from pathlib import Path

from conveyor.testing.tiny import save_tiny


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "tiny-llama"
    print(save_tiny("llama", out, seed=0, num_hidden_layers=4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
