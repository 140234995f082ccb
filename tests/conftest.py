"""Shared fixtures. Everything here runs offline and on the CPU."""

import os

# Before transformers / datasets / lm_eval are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
