"""Whether Cloud Storage can be used from here, said at once and in words.

Without it, a write into ``gs://`` failed deep in the client with ``DefaultCredentialsError`` (a
traceback), and a read offline retried for two minutes before a ``RetryError``. The checks run before
the first ``gs://`` operation: credentials, and one request to the service with a short timeout (through
the proxy the environment names, as the client would). A Cloud Storage emulator (``STORAGE_EMULATOR_HOST``)
is used as it is.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request

from ..errors import SimilarPatientsError
from .optional import optional_import

#: The service a gs:// path is read from and written to.
ENDPOINT = "https://storage.googleapis.com/"
#: Seconds the service may take to answer before it counts as unreachable.
TIMEOUT_S = 10.0


@functools.lru_cache(maxsize=1)
def check() -> None:
    """Refuse at once when Cloud Storage cannot be used from here: no credentials (Beam would retry for
    20 s, logging tracebacks, then connect anonymously, which no write and no private bucket allows), or no
    answer from the service (the client would retry for two minutes). Checked once per process; an
    emulator is not checked."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    auth = optional_import("google.auth", "pipeline")
    exceptions = optional_import("google.auth.exceptions", "pipeline")
    try:
        auth.default()
    except exceptions.DefaultCredentialsError:
        raise SimilarPatientsError(
            "No Google Cloud credentials were found for Cloud Storage (gs://). Run `gcloud auth application-default "
            "login` (a person), or set GOOGLE_APPLICATION_CREDENTIALS to a service account key file (a machine), "
            "then try again; or use a local folder."
        ) from None
    try:
        urllib.request.urlopen(ENDPOINT, timeout=TIMEOUT_S).close()
    except urllib.error.HTTPError:
        pass  # it answered, with an error status: reachable
    except (urllib.error.URLError, OSError):
        raise SimilarPatientsError(
            f"Cannot reach Google Cloud Storage ({ENDPOINT}) within {TIMEOUT_S:.0f} s: this machine is offline, or "
            f"a firewall or proxy stops it. Connect (or set HTTPS_PROXY) and try again, or use a local folder."
        ) from None
