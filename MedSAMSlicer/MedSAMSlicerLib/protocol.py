"""The client's copy of the server's protocol: routes, wire constants, and the names the panel offers.

Stdlib only, so that Slicer's Python (which has no ``medsam_server``) can read it. The server's
``medsam_server/protocol.py`` (before it existed: ``wire.py``, ``api.py``, ``models``, ``preprocess``)
is the source; each name here is the source's name for the same thing, and a server test compares them.
"""

from __future__ import annotations

#: Bumped by the server whenever a route, a field or the wire encoding changes incompatibly.
API_VERSION = 1

ENVELOPE_TYPE = "application/vnd.medsam.array"
JSON_TYPE = "application/json"
MAGIC = b"MSW1"
API_VERSION_HEADER = "X-MedSAM-API"
SESSION_KEY_HEADER = "X-MedSAM-Session-Key"
REPLICA_HEADER = "X-MedSAM-Replica"  # which Ray Serve replica holds the session (logged)
IMAGE_DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "float32", "float64")
LABEL_DTYPES = ("uint8", "uint16")
MASK_DTYPE = "uint8"
COMPRESSIONS = ("zlib", "gzip")

# Routes (``str.format`` templates of the path).
ROUTE_HEALTH = "/health"
ROUTE_INFO = "/info"
ROUTE_SESSIONS = "/sessions"
ROUTE_SESSION = "/sessions/{session_id}"
ROUTE_SEGMENT = "/sessions/{session_id}/segment"
ROUTE_PREFETCH = "/sessions/{session_id}/prefetch"
ROUTE_ANNOTATE = "/sessions/{session_id}/annotate"
ROUTE_JOB = "/sessions/{session_id}/jobs/{job_id}"
ROUTE_JOB_RESULT = "/sessions/{session_id}/jobs/{job_id}/result"
ROUTE_THRESHOLD = "/sessions/{session_id}/threshold"
ROUTE_ALTERNATIVES = "/sessions/{session_id}/alternatives"
#: Candidates of an alternatives answer: 0 the run's own mask, 1..3 the decoder's other mask outputs.
ALTERNATIVE_COUNT = 4

#: Model names ``medsam serve --model`` accepts (the first is the default) and what the panel calls them.
MODEL_NAMES = ("litemedsam", "medsam-vit-b")
MODEL_LABELS = {"litemedsam": "LiteMedSAM (fast)", "medsam-vit-b": "MedSAM ViT-B"}
#: Intensity windows a prompt document may name, and what the panel calls them.
WINDOW_NAMES = ("auto", "ct-soft", "ct-lung", "ct-bone", "ct-brain", "mr")
WINDOW_LABELS = {"auto": "Auto (from the data)", "ct-soft": "CT soft tissue", "ct-lung": "CT lung",
                 "ct-bone": "CT bone", "ct-brain": "CT brain", "mr": "MR"}
