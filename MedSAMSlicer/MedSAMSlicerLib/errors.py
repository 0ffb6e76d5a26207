"""The Lib's errors: ``InputError`` for input a user can fix, and what the server client raises."""


class InputError(ValueError):
    """Something the user gave (nodes, markups, settings) cannot be used; the message says what to change."""


class MedSAMClientError(RuntimeError):
    """Base of every error this client raises; the message says what to do."""


class ServerNotRunning(MedSAMClientError):
    """The server cannot be reached, stopped answering, or dropped the connection."""


class AuthError(MedSAMClientError):
    """No token, or the wrong one."""


class VersionMismatch(MedSAMClientError):
    """Client and server speak different API versions."""


class RequestTooLarge(MedSAMClientError):
    """The request is over the server's limits (``medsam serve --max-upload-mb``)."""


class Cancelled(MedSAMClientError):
    """The caller cancelled; nothing was returned."""


class ServerError(MedSAMClientError):
    """The server refused or failed a request; ``status`` and ``code`` say how."""

    def __init__(self, status: int, message: str, code: str = ""):
        super().__init__(f"server error {status}: {message}")
        self.status, self.code, self.server_message = status, code, message


class UnknownSession(ServerError):
    """The session expired, was deleted, or belongs to someone else: upload the volume again."""


class SessionLost(UnknownSession):
    """The server lost this session (410 ``session_lost``: the replica holding it stopped): upload again."""

    def __init__(self, status: int, message: str, code: str = "session_lost"):
        super().__init__(status, message, code)
        self.args = (f"the server lost this session: upload again ({message})",)


class ServerBusy(ServerError):
    """429 ``busy``: the server's message says what to free or wait for, and is shown as it is."""

    def __init__(self, status: int, message: str, code: str = "busy"):
        super().__init__(status, message, code)
        self.args = (message,)
