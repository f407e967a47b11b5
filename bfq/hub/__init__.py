"""Hugging Face Hub: load .bfq files by repo id (`bfq.download`, re-exported here), publish them
with `push` and a generated model card (`card`)."""

from bfq.download import (
    HubDownloadError,
    HubError,
    download_bfq,
    explain,
    is_repo_id,
    parse_repo_id,
    resolve,
)
from bfq.hub.card import base_model_info, block_bits, model_card
from bfq.hub.push import make_preview, push

__all__ = [
    "HubDownloadError", "HubError", "base_model_info", "block_bits", "download_bfq", "explain", "is_repo_id",
    "make_preview", "model_card", "parse_repo_id", "push", "resolve",
]
