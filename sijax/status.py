"""Every outcome of a test, named once (the test, the batch, the experiments and
``sijax evaluate`` share it).

``Status`` is a ``str`` enum, so ``result.status == "ok"`` keeps working; inside
compiled code a status travels as its integer :attr:`Status.code` (a batch returns
an int array), and :meth:`Status.from_code` turns it back.
"""

import enum


class Status(str, enum.Enum):
    """Outcome of one DAL test.

    Members:
      OK: a region was found and its p-value computed to the requested precision
        (or decided, with termination "decision").
      NO_REGION: the detected region is empty: there is no hypothesis to test
        (reported, not an error).
      MAX_PIECES: the search hit ``max_pieces``; the p-value and its bounds are
        those of the part of the line searched.
      ERROR: the search failed (non-finite line, degenerate variance); the result
        has no p-value.
    """

    OK = "ok"
    NO_REGION = "no region"
    MAX_PIECES = "max_pieces"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value

    @property
    def code(self) -> int:
        """The integer a compiled batch uses for this status (0-3)."""
        return _CODES[self]

    @classmethod
    def from_code(cls, code) -> "Status":
        """The status of an integer code (a batch's ``status`` entry)."""
        return _BY_CODE[int(code)]

    @property
    def valid(self) -> bool:
        """Whether the test produced a p-value (OK or MAX_PIECES)."""
        return self in (Status.OK, Status.MAX_PIECES)


_CODES = {Status.OK: 0, Status.NO_REGION: 1, Status.MAX_PIECES: 2, Status.ERROR: 3}
_BY_CODE = {v: k for k, v in _CODES.items()}
