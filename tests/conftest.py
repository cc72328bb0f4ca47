import os
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")
# The test suite never reaches the real Hugging Face Hub: Hub ids resolve from the cache only, unless a test
# (tests/test_hub.py) points HF_ENDPOINT at its stand-in server on 127.0.0.1.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
