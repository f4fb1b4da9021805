# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""README command 1: fine-tune all-MiniLM-L6-v2 on tweet sentiment with L_depth, calibrate ASTI, compare every rule.

    python recipes/quickstart.py [--output_dir outputs/quickstart] [any flag of train_classifier.py]
"""

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_classifier import main, parse_args  # noqa: E402


if __name__ == "__main__":
    config = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "quickstart.yaml")
    main(*parse_args(["--config", config, *sys.argv[1:]]))
