"""Which of two answers a request gets where SPIKE's Go Nexus and spike differ (docs/spike-compatibility.md).

spike's own clients send `EXTENSIONS_HEADER` with every request and read spike's answers (409 for a
request that conflicts with Nexus's state, with a reason).  SPIKE's Go SDK sends only Content-Type and
maps nothing but 400, 401, 404 and 503 (anything else is "unexpected status code from peer"): a request
without the header gets the answer SPIKE's Go Nexus gives.  Request bodies that carry one of spike's
extension fields (`cas`, `createOnly`, `limit`, `after`, ...) already say which dialect they speak.
"""

from __future__ import annotations

from spike.app.api.messages import EXTENSIONS_HEADER
from spike.protocol.api import ApiRequest


def speaks_spike_go(request: ApiRequest) -> bool:
    """Whether the caller expects SPIKE's Go Nexus's answers (it did not say it reads spike's)."""
    return EXTENSIONS_HEADER not in request.headers
