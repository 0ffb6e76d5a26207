"""The ingress's bookkeeping for ``medsam serve --replicas N``: which replica holds each session, which
replicas are alive, and the limits that span replicas. Standard library only (no Ray, no torch).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

LOST = "lost"  # a placement's incarnation once its replica died: the session is lost (SessionLost)


@dataclass
class ScaleOut:
    """How many replicas and what each holds; the rest of the server's settings are ``Settings``."""

    replicas: int = 2
    num_cpus: float = 1.0  # per replica; also its torch and ONNX Runtime threads (unless --threads)
    num_gpus: float = 0.0  # per replica: 1 gives each its own GPU where there are several


@dataclass(frozen=True)
class Gate:
    """What the ingress enforces, copied from Settings so that the ingress imports no model code (no torch)."""

    tokens: tuple[str, ...]
    max_sessions: int
    max_sessions_per_token: Optional[int]
    idle_seconds: float
    max_body_bytes: int

    @classmethod
    def of(cls, settings) -> Gate:
        # the single-process server's own rule (app.Server.start), here counted over all replicas
        several = len(settings.tokens) > 1
        per_token = settings.max_sessions_per_token or (max(1, settings.max_sessions // 2) if several else None)
        return cls(tuple(settings.tokens), settings.max_sessions, per_token, settings.session_idle_seconds,
                   settings.limits.max_body_bytes)


@dataclass
class Placement:
    replica: int
    incarnation: str
    owner: str
    last_used: float = dataclasses.field(default_factory=time.monotonic)


class Router:
    """The session -> replica map, the live replicas' incarnations and the limits that span replicas."""

    def __init__(self, replicas: int, gate: Gate):
        self.incarnations: list[Optional[str]] = [None] * replicas  # None: not known alive
        self.sessions: dict[str, Placement] = {}
        self.uploading: dict[str, Placement] = {}  # uploads under way count as sessions (concurrent uploads)
        self.idle_seconds = gate.idle_seconds
        self.max_sessions = gate.max_sessions
        self.per_token = gate.max_sessions_per_token

    def live(self) -> list[Placement]:
        return [p for p in (*self.sessions.values(), *self.uploading.values()) if p.incarnation != LOST]

    def held(self, replica: int) -> int:
        return sum(1 for p in self.live() if p.replica == replica)

    def expire(self, now: Optional[float] = None) -> None:
        """Forget sessions idle past the limit (their replica expires them itself)."""
        now = time.monotonic() if now is None else now
        for session_id in [s for s, p in self.sessions.items() if now - p.last_used > self.idle_seconds]:
            del self.sessions[session_id]

    def refusal(self, owner: str) -> Optional[str]:
        """Why a new session of ``owner`` is refused (the ingress raises Busy), or None."""
        self.expire()
        if len(self.live()) >= self.max_sessions:
            return (f"the server holds its maximum of {self.max_sessions} sessions; delete one you no longer need "
                    "(or wait for idle ones to expire)")
        if self.per_token is not None and sum(p.owner == owner for p in self.live()) >= self.per_token:
            return (f"this token holds its maximum of {self.per_token} sessions; delete one you no longer need "
                    "(or wait for idle ones to expire)")
        return None

    def order(self) -> list[int]:
        """Replicas to try for a new session: live ones, fewest sessions first; then the rest."""
        return sorted(range(len(self.incarnations)), key=lambda r: (self.incarnations[r] is None, self.held(r), r))

    def seen(self, replica: int, incarnation: str) -> None:
        """A replica answered as ``incarnation``: if it is a replacement, its predecessor's sessions are lost."""
        if self.incarnations[replica] != incarnation:
            self.died(replica, self.incarnations[replica])
            self.incarnations[replica] = incarnation

    def died(self, replica: int, incarnation: Optional[str]) -> None:
        if incarnation is None or self.incarnations[replica] == incarnation:
            self.incarnations[replica] = None
        for placement in self.sessions.values():
            if placement.replica == replica and placement.incarnation == incarnation:
                placement.incarnation = LOST
