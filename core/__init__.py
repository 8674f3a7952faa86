"""Centinela: privacy-governed, federated identity matching.

The package is assembled from the repository's top-level folders: ``centinela.server``,
``centinela.matcher``, ``centinela.policy``, ``centinela.audit``, ``centinela.clients`` and
the generated wire contract ``centinela.v1``. This root holds what every component may
import: ``errors``, ``config``, ``storage`` and ``logs``.
"""

__version__ = "0.1.0"
