"""mmfuse: multimodal models behind an asynchronous HTTP API.

The installed package maps the repository's top-level directories (``pyproject.toml``'s ``package-dir``):
``mmfuse.gateway`` is ``gateway/``, ``mmfuse.workers`` is ``workers/``, ``mmfuse.shared`` is ``shared/`` and
``mmfuse.cli`` is ``cli/``. The API client is a distribution of its own, ``mmfuse-client`` (``client/``).
"""

__version__ = "0.1.0"
