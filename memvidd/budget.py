"""The daemon's budget of bytes taken in from clients, shared by every connection of both
sockets (``limits.max-buffer-bytes``).

A connection's reader takes bytes from the budget *before* it keeps them: a message's whole
length as soon as its length prefix is read (so a message is refused before its body costs
anything), a JSON line's bytes chunk by chunk as they arrive. A message read is still held
until its reply is ready (a put: until it is durable), and a read's reply until it is sent,
so the budget also bounds what pipelined requests keep queued and what a client that does
not read leaves behind. When the budget cannot cover more, ``OverBudget`` is raised and the
client gets a clear, retryable error instead of the daemon's memory.
"""

from __future__ import annotations


class OverBudget(Exception):
    """The budget cannot cover a message now (``retryable``) or ever (it is larger than the
    whole budget)."""

    def __init__(self, wanted: int, whole: int, used: int, limit: int) -> None:
        if whole > limit:
            why = f"a message of {whole} bytes can never fit in limits.max-buffer-bytes ({limit})"
        else:
            why = (f"the daemon holds {used} of its {limit} bytes of client buffers "
                   f"(limits.max-buffer-bytes) and cannot take {wanted} more now; retry later")
        super().__init__(why)
        self.retryable = whole <= limit


class Budget:
    """Bytes held across all connections, never above ``limit``. Trio code only (one thread)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.refused = 0

    def take(self, n: int, whole: int, *, spare: int = 0) -> None:
        """``n`` more bytes, for a message (or buffer) of ``whole`` bytes, leaving at least
        ``spare`` bytes of the budget free."""
        if self.used + n > self.limit - spare:
            self.refused += 1
            raise OverBudget(n, whole, self.used, self.limit)
        self.used += n
        self.peak = max(self.peak, self.used)

    def give(self, n: int) -> None:
        self.used -= n

    def stats(self) -> dict[str, int]:
        return {"bytes": self.used, "peak": self.peak, "limit": self.limit, "refused": self.refused}


class Share:
    """One connection's part of the budget: the bytes its reader buffers, and the messages
    it handed on that are not answered yet. ``close`` gives everything back, whatever state
    the connection ended in."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.buffered = 0  # covers the reader's buffer (and a message being read, whole)
        self.pending = 0  # messages read, replies not ready
        self.closed = False

    def cover(self, n: int) -> None:
        """Make the buffer's share at least ``n`` bytes (``OverBudget`` if it cannot be had)."""
        if n > self.buffered:
            self.budget.take(n - self.buffered, n)
            self.buffered = n

    def trim(self, n: int) -> None:
        """Give back what the buffer holds beyond ``n`` bytes."""
        if self.buffered > n:
            self.budget.give(self.buffered - n)
            self.buffered = n

    def hand_on(self, n: int) -> int:
        """``n`` bytes leave the buffer as a message; they stay held until ``answered(n)``."""
        self.buffered -= n
        self.pending += n
        return n

    def hold(self, n: int, *, spare: int = 0) -> None:
        """``n`` more bytes held (a reply waiting to be sent) until ``answered(n)``,
        leaving ``spare`` bytes of the budget free."""
        if not self.closed:
            self.budget.take(n, n, spare=spare)
            self.pending += n

    def hold_queued(self, n: int) -> None:
        """``hold`` for commits queued to a tail stream: those may fill only half of the
        budget, so streams that fell behind never leave requests without room."""
        self.hold(n, spare=self.budget.limit // 2)

    def answered(self, n: int) -> None:
        if not self.closed:
            self.pending -= n
            self.budget.give(n)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.budget.give(self.buffered + self.pending)
            self.buffered = self.pending = 0
