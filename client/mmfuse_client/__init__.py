"""The mmfuse API client (``pip install mmfuse-client``; requests only, never torch).

- ``mmfuse_client.http``: :class:`MmfuseClient` submits jobs, long-polls them and cancels them.
- ``mmfuse_client.webhooks``: signs and verifies webhook callbacks; the standard library only, and the one
  home of the signature scheme (the server signs with it too).
"""

from mmfuse_client.http import MmfuseClient, MmfuseError
from mmfuse_client.webhooks import WebhookVerificationError, verify_webhook

__all__ = ["MmfuseClient", "MmfuseError", "WebhookVerificationError", "verify_webhook"]
__version__ = "0.1.0"
