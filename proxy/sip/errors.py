"""The one error type the SIP layer raises for bad bytes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.sip.message import SipMessage


class ParseError(ValueError):
    """A message (or part of one) that does not follow RFC 3261.

    `status` is the response a request deserves (400, 505 for a bad version, 501 for an unknown
    method with a CSeq mismatch). `message` is what could be parsed before the problem, when the
    start line and header rows were readable; `can_respond` says whether it has what a response
    needs (Via, From, To, Call-ID, CSeq), so the transport can answer instead of dropping.
    """

    def __init__(self, reason: str, status: int = 400, message: SipMessage | None = None):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.message = message

    @property
    def can_respond(self) -> bool:
        msg = self.message
        if msg is None or not msg.is_request or msg.method == "ACK":
            return False
        # RFC 4475 §3.3.1: answer even when From/To/Call-ID are missing; a Via is what we need
        try:
            msg.top_via  # noqa: B018
        except ParseError:
            return False
        return True
