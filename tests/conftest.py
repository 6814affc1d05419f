"""Test-wide settings: one torch thread, so that tests stay fast when other work shares the cores."""

import os

import torch

# Small networks gain nothing from intra-op threads, and oversubscribed threads on a busy
# machine were measured 15-20x slower. PYRO_STRUCT_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("PYRO_STRUCT_TEST_THREADS", "1")))
