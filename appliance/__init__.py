"""The on-prem appliance: catalog, audit, vault, data, train, optimize, serve, jobs. No UI code.

Importing this package switches Hugging Face and telemetry to offline mode before anything
else can import them (see `appliance.offline`). Heavy libraries (torch, transformers,
tensorrt) are imported inside the functions that need them.
"""

from appliance.offline import enforce_offline

enforce_offline()

__version__ = "0.1.0"
