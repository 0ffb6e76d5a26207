"""The wire protocol's single source: API version, routes, content types, dtypes, header fields, limits.

Standard library only: the Slicer client keeps a copy (``MedSAMSlicer/MedSAMSlicerLib/protocol.py``)
with the same names for what it copies, and ``tests/test_protocol.py`` checks that every value there
equals the one here. The envelope format itself is described in :mod:`.wire`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: Bumped whenever a route, a field or the wire encoding changes incompatibly;
#: the Slicer client refuses a server whose API_VERSION differs from its own.
API_VERSION = 1

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765

ENVELOPE_TYPE = "application/vnd.medsam.array"
JSON_TYPE = "application/json"
MAGIC = b"MSW1"
#: Every request may say which API it speaks; a different one is refused.
API_VERSION_HEADER = "X-MedSAM-API"
#: The per-session secret returned by an upload; session routes need it (it never appears in a URL or a log).
SESSION_KEY_HEADER = "X-MedSAM-Session-Key"
#: On every answer of a Ray Serve replica: which replica holds the session (the Slicer module logs it).
REPLICA_HEADER = "X-MedSAM-Replica"

IMAGE_DTYPES = ("uint8", "int8", "uint16", "int16", "int32", "float32", "float64")
LABEL_DTYPES = ("uint8", "uint16")
#: Masks of a segment answer travel as 0/1 bytes.
MASK_DTYPE = "uint8"
RGB_CHANNELS = 3
COMPRESSIONS = ("zlib", "gzip")
#: The keys an envelope's ``"array"`` entry may hold.
ARRAY_FIELDS = ("dtype", "shape", "compression", "spacing", "origin", "direction", "offset")
#: Labels travel as uint16: a segment's label is 1..MAX_LABEL.
MAX_LABEL = 65535
#: Segments one prompt document may hold (far more than any labelmap of a body has).
MAX_SEGMENTS = 1024
#: Probabilities above this are inside a mask (both model families, as upstream): the default of every
#: threshold (``medsam annotate --threshold``, the annotate request's option, a kept run's).
MASK_THRESHOLD = 0.5
#: Candidates of an alternatives answer: 0 the run's own mask (SAM's mask token 0, or the fused views), 1..3 the
#: decoder's other mask tokens.
ALTERNATIVE_COUNT = 4

# Routes (``str.format`` templates of the path).
ROUTE_HEALTH = "/health"
ROUTE_INFO = "/info"
ROUTE_SESSIONS = "/sessions"
ROUTE_SESSION = "/sessions/{session_id}"
ROUTE_SEGMENT = "/sessions/{session_id}/segment"
ROUTE_PREFETCH = "/sessions/{session_id}/prefetch"
ROUTE_ANNOTATE = "/sessions/{session_id}/annotate"
#: Move a segment's probability threshold over its last annotate run (no model call).
ROUTE_THRESHOLD = "/sessions/{session_id}/threshold"
#: One slice of a segment's last run: its mask and the decoder's other mask outputs, and choose one (no encoder call).
ROUTE_ALTERNATIVES = "/sessions/{session_id}/alternatives"
ROUTE_JOB = "/sessions/{session_id}/jobs/{job_id}"
ROUTE_JOB_RESULT = "/sessions/{session_id}/jobs/{job_id}/result"

#: A job status request waits at most this long for the job to end (``?wait=S``).
MAX_POLL_WAIT_SECONDS = 10.0
#: Shortest bearer token the server accepts.
MIN_TOKEN_LENGTH = 16
#: Largest decoder batch an annotate request may ask for.
MAX_BATCH_SIZE = 64

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Hard caps on what a request may make the server hold; ``/info`` reports them."""

    max_body_bytes: int = 1 * GiB  # a request body as sent (compressed)
    max_decompressed_bytes: int = 2 * GiB  # one array after decompression
    max_voxels: int = 1 << 28  # 268 M voxels, e.g. 512 x 512 x 1024
    max_dim: int = 1 << 16
    max_header_bytes: int = 1 * MiB  # the envelope's JSON
    max_json_bytes: int = 8 * MiB  # a plain JSON request body (prompt documents, boxes)
    max_boxes_per_request: int = 512
    max_points_per_box: int = 32

    def as_dict(self) -> dict:
        return asdict(self)
