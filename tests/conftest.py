"""Test-suite settings: no traffic beyond loopback, quiet Comet, few threads on the 2-core CI machine."""

import os

# Comet's environment probes (cloud metadata, backend-host IP lookup) are switched off: no traffic leaves loopback.
for key, value in {
    "COMET_AUTO_LOG_ENV_DETAILS": "false",
    "COMET_AUTO_LOG_ENV_HOST": "false",
    "COMET_AUTO_LOG_GIT_METADATA": "false",
    "COMET_AUTO_LOG_GIT_PATCH": "false",
    "COMET_ERROR_TRACKING_ENABLE": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(key, value)
os.environ.pop("COMET_API_KEY", None)
