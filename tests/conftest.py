import os

# Every model a test builds is local: a Hugging Face hub lookup from timm or transformers would be a bug.
# Set before either library is imported, since huggingface_hub reads it at import.
os.environ["HF_HUB_OFFLINE"] = "1"
