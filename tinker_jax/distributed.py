"""Multi-host start-up on JAX's multi-controller runtime, and process 0's message stream.

Every host runs the same program on one global mesh (`jax.devices()` spans all processes).
`initialize` joins the processes: from an explicit coordinator address, process count and id,
or auto-detected (Cloud TPU VM metadata, SLURM, Open MPI). On CPU the cross-process
collectives are gloo's.

`MessageStream` carries an ordered stream of byte messages from process 0 to every other
process over the key-value store of JAX's coordination service (the one
`jax.distributed.initialize` started; Orbax keeps its barriers there too). Why not
`multihost_utils.broadcast_one_to_all`: that is a device collective, so an idle follower
would sit inside a collective (with its timeouts) until the next request arrives, and every
payload size would be a new compiled program; the store needs neither, and a follower waiting
on it is just a blocked RPC that it renews.
"""

from __future__ import annotations

import logging

import jax

log = logging.getLogger("tinker_jax.distributed")

_PREFIX = "tinker_jax/stream"
_POLL_MS = 60_000  # a follower's blocking read is renewed this often while the leader idles
_COLLECT_EVERY = 64  # the leader deletes delivered messages every this many publishes


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> None:
    """Joins the multi-host runtime before any JAX computation: with `coordinator`
    (host:port of process 0's coordination service), `num_processes` and `process_id`
    all given, or, with `auto`, from the environment (Cloud TPU, SLURM, Open MPI).
    Nothing given and not `auto`: a single-process server, nothing to do."""
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("give all of --coordinator, --num-processes and --process-id")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id} is outside [0, {num_processes})")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif auto:
        jax.distributed.initialize()
    else:
        return
    log.info(
        "process %d of %d: %d local devices, %d in all",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def process_index() -> int:
    """This process's index; 0 serves clients (and is the only process when single-host)."""
    return jax.process_index()


def _client():
    from jax._src import distributed  # the runtime's client; Orbax reaches it the same way

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return client


class MessageStream:
    """Messages published by process 0, received in order by every other process.

    Message i is the store key `<prefix>/<i>`; each receiver acknowledges the count it has
    read under `<prefix>.ack/<process>`, and the leader deletes what every receiver has read.
    """

    def __init__(self, name: str = "engine"):
        self._client = _client()
        self._prefix = f"{_PREFIX}/{name}"
        self._next = 0  # the next message to publish / receive
        self._kept = 0  # leader: the oldest message not yet deleted

    def publish(self, message: bytes) -> None:
        """Process 0: appends a message to the stream (returns at once)."""
        self._client.key_value_set_bytes(f"{self._prefix}/{self._next}", message)
        self._next += 1
        if self._next % _COLLECT_EVERY == 0:
            self._collect()

    def receive(self) -> bytes:
        """Processes > 0: the next message, waiting as long as it takes."""
        key = f"{self._prefix}/{self._next}"
        while True:
            try:
                message = self._client.blocking_key_value_get_bytes(key, _POLL_MS)
                break
            except jax.errors.JaxRuntimeError as e:
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
        self._next += 1
        self._client.key_value_set(
            f"{self._prefix}.ack/{jax.process_index()}", str(self._next), allow_overwrite=True
        )
        return message

    def _collect(self) -> None:
        """Deletes the messages that every receiver has acknowledged."""
        read = []
        for p in range(1, jax.process_count()):
            try:
                read.append(int(self._client.key_value_try_get(f"{self._prefix}.ack/{p}")))
            except jax.errors.JaxRuntimeError:  # NOT_FOUND: that process has read nothing yet
                return
        for i in range(self._kept, min(read)):
            self._client.key_value_delete(f"{self._prefix}/{i}")
        self._kept = max(self._kept, min(read))
