# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
import os


# Tests never touch the network: everything they load ships in the repo or in offline wheels.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
