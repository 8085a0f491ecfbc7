"""Which submitted client tasks train together (``runtime.clients_per_batch``), the same on every engine."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

Task = TypeVar("Task")  # a ClientTask, or what an executor keeps per task


class Batches(Generic[Task]):
    """Groups the tasks a loop submits into batches: consecutive submissions from one published version, at
    most ``size`` of them. The open batch closes when it is full, when a task of another version is submitted,
    or when the loop next waits for a result.

    The loop makes the same calls on every engine and worker count, so the batches are the same too. That
    matters for bits: a client's update does not depend on its batch-mates' weights, but it can depend, in
    the last float digits, on how long their sequences are (attention kernels block over the padded length).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.open: list[Task] = []
        self.version: Any = None  # the published handle the open batch's tasks train from

    def add(self, task: Task, version: Any) -> list[list[Task]]:
        """Take ``task`` (training from ``version``); the batches this closes, in order."""
        closed = self.close() if self.open and version is not self.version else []
        self.open.append(task)
        self.version = version
        if len(self.open) == self.size:
            closed += self.close()
        return closed

    def close(self) -> list[list[Task]]:
        """Close the open batch (the loop waits for a result now); the batch, if any."""
        batch, self.open = self.open, []
        return [batch] if batch else []
