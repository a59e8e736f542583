"""Stage-2 tests run on the real stage-1 data root (`shards_root` in tests/conftest.py) and never
reach the network: every model is the tiny one, built in memory or saved to a temp folder."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
