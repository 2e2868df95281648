"""Nothing the transformers engine does may reach the Hugging Face hub: imported before
transformers (and huggingface_hub) are, by every module that loads them; every load also
passes `local_files_only=True`."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
