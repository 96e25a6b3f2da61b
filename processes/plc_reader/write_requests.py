"""The reader's side of the command socket: write requests from the uplink, and their results.

The main thread owns the ROUTER, because ZeroMQ sockets stay on one thread. It looks up the
tag, hands a WriteJob to the poller of the tag's device, and sends the result that the
poller posts back. The poller runs the job on its own connection between two polls, so a
write waits at most for the poll in progress and never delays another device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import zmq

from common import wire
from common.config import Tag
from common.errors import PlcBridgeError
from common.logs import fields

STATUS_OK = "ok"
STATUS_REJECTED = "rejected"
STATUS_FAILED = "failed"

REASON_UNKNOWN_TAG = "unknown tag"
REASON_TIMEOUT = "timeout"
REASON_NO_POLLER = "device not polled"


@dataclass(frozen=True)
class WriteJob:
    """One write request: the uplink's route and ids, the tag, the value, and its deadline.

    deadline_s is on time.monotonic(). A job taken up later gets a timeout result, unwritten.
    """

    route: bytes
    write_id: int
    request_id: str
    tag: Tag
    value: Any
    deadline_s: float

    def result(self, status: str, reason: str | None = None, message: str = "") -> dict[str, Any]:
        """Return the header of the written message for this job."""
        return {"write_id": self.write_id, "request_id": self.request_id, "tag": self.tag.name,
                "status": status, "reason": reason, "message": message, "value": self.value}


class WriteServer:
    """Receives write requests on the command ROUTER and sends their results."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        tags: Mapping[str, Tag],
        logger: logging.Logger,
    ) -> None:
        self.endpoint = endpoint
        self._tags = tags
        self._logger = logger
        try:
            self._socket = wire.make_socket(context, zmq.ROUTER, wire.COMMAND_HWM, linger_ms=0)
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            raise PlcBridgeError(
                f"cannot bind the command endpoint {endpoint}: {exc}; check that no other "
                "reader runs with this runtime_dir") from exc

    def receive(self) -> tuple[list[WriteJob], list[tuple[bytes, dict[str, Any]]]]:
        """Return the jobs that arrived, and the results of requests rejected here."""
        jobs: list[WriteJob] = []
        answers: list[tuple[bytes, dict[str, Any]]] = []
        while True:
            try:
                route, *frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return jobs, answers
            try:
                job = self._parse(route, frames)
            except ValueError as exc:
                self._logger.warning("invalid_write_request %s",
                                     fields(error=exc, consequence="request ignored"))
                continue
            if isinstance(job, WriteJob):
                jobs.append(job)
            else:
                answers.append((route, job))

    def _parse(self, route: bytes, frames: list[bytes]) -> WriteJob | dict[str, Any]:
        message = wire.decode(frames)
        if message.kind != wire.WRITE:
            raise ValueError(f"expected a write request, got kind {message.kind!r}")
        header = message.header
        write_id, request_id = header.get("write_id"), header.get("request_id")
        name, deadline_ms = header.get("tag"), header.get("deadline_ms")
        if not isinstance(write_id, int) or not isinstance(request_id, str):
            raise ValueError(f"invalid write_id {write_id!r} or request_id {request_id!r}")
        if not isinstance(name, str) or not isinstance(deadline_ms, int | float):
            raise ValueError(f"invalid tag {name!r} or deadline_ms {deadline_ms!r}")

        tag = self._tags.get(name)
        if tag is None:
            return {"write_id": write_id, "request_id": request_id, "tag": name,
                    "status": STATUS_REJECTED, "reason": REASON_UNKNOWN_TAG,
                    "message": f"no tag named {name!r} in the configuration",
                    "value": header.get("value")}
        return WriteJob(route, write_id, request_id, tag, header.get("value"),
                        deadline_ms / 1000)

    def answer(self, route: bytes, result: dict[str, Any]) -> None:
        """Send a write's result; drop it when the uplink is gone, which then times out."""
        try:
            self._socket.send_multipart([route, *wire.encode(wire.WRITTEN, result)], zmq.NOBLOCK)
        except zmq.Again:
            self._logger.warning(
                "write_result_dropped %s",
                fields(request_id=result.get("request_id"), status=result.get("status"),
                       consequence="the uplink reports a timeout for this write"))

    def close(self) -> None:
        self._socket.close()


def expired(job: WriteJob) -> dict[str, Any] | None:
    """Return the timeout result of a job whose deadline has passed, or None."""
    if time.monotonic() <= job.deadline_s:
        return None
    return job.result(STATUS_FAILED, REASON_TIMEOUT,
                      "the reader reached the write after its deadline, so nothing was "
                      "sent to the PLC")
