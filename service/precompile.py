"""Start-up precompilation of each base model's programs (`tinker_jax.precompile`), in the
background.

The server listens at once. A thread per engine worker hands the plan's programs to the engine
thread one at a time, each only once no user operation has been queued or running there (the
worker's reserved places) for IDLE_SECONDS: a request that arrives meanwhile waits for the one
program being built, never for the plan; a user's next call, sent as the last one finished,
finds the engine free; and under steady load the plan waits (what that load needs is then
compiled on first use, as without a plan). Each program runs through the engine's call path
(`engine_calls.Precompile`), so on a multi-host server every host builds the same programs in
host 0's order, and each process writes or reads them in the persistent compilation cache.

Once the plan is done, the thread goes on building, the same way, the programs of each
prefix-cache hit that ran without them (the sampler prefilled it from position 0 meanwhile:
`tinker_jax.prefix_cache.HitPrograms`).

Every compiled program holds memory maps, and a process that reaches the kernel's limit on
them crashes (`service/memory_maps.py`). Before each program the thread checks the process's
maps: once they reach MAP_SHARE of the limit it builds nothing more, skips the rest of the plan
and logs why, leaving the remaining maps to what users' requests compile (kept under the
limit by `memory_maps.MapGuard`, which drops least recently used programs).
"""

from __future__ import annotations

import logging
import threading
import time

from tinker_jax.precompile import Key, PrefixHit, plan
from tinker_jax.service import engine_calls as calls
from tinker_jax.service.memory_maps import map_usage
from tinker_jax.service.metrics import compilations
from tinker_jax.service.worker import Callback, EngineWorker

log = logging.getLogger("tinker_jax.precompile")

# How long the engine must have been free of user operations before the next program starts
# (a client's next call follows its last result within it), and how often that is checked.
IDLE_SECONDS = 0.5
POLL_SECONDS = 0.05
# The share of vm.max_map_count past which no more programs are built ahead (module docstring).
MAP_SHARE = 0.5


class Precompiler:
    """Builds one worker's precompile plan of `level` (`tinker_jax.precompile.LEVELS`) once
    `start`ed; `done` is set when every program is built or skipped. A program that cannot
    run when its turn comes (its slots taken by users' runs) is tried again after the others,
    once, and then skipped (`skipped_keys`), as is every program left once the process holds
    MAP_SHARE of its memory-map limit (`maps_full`). The counts (`built`, and the XLA programs
    `compiled` or loaded from the persistent cache, `cached`) grow as it goes; `seconds` is the
    plan's wall time once done. Then it builds prefix-cache hits' programs as they are wanted
    (`hits_built`) until stopped."""

    def __init__(self, worker: EngineWorker, level: str):
        self.worker = worker
        self.keys: list[Key] = plan(worker.engine.trainer, worker.engine.sampler, level)
        self.done = threading.Event()
        self.built = self.compiled = self.cached = self.hits_built = 0
        self.skipped_keys: list[Key] = []
        self.maps_full = False
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"precompile:{worker.base_model}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops after the program being built (the engine thread finishes it)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def progress(self) -> dict[str, int]:
        """Programs planned, built and skipped so far (for /metrics)."""
        return {"planned": len(self.keys), "built": self.built, "skipped": len(self.skipped_keys)}

    def _run(self) -> None:
        name = self.worker.base_model
        if self.keys:
            log.info("precompiling %d programs of %s in the background", len(self.keys), name)
        start = time.monotonic()
        later = []
        for i, key in enumerate(self.keys):
            if self._maps_full():
                self.skipped_keys += self.keys[i:]
                break
            built = self._wait_idle() and self._build(key)
            if built is None:
                return
            if built:
                self.built += 1
            else:
                later.append(key)
        for key in later:
            built = not self._maps_full() and self._wait_idle() and self._build(key)
            if built is None:
                return
            if built:
                self.built += 1
            else:
                self.skipped_keys.append(key)
        self.seconds = time.monotonic() - start
        if self.keys:
            log.info(
                "precompiled %d programs of %s in %.1f s: %d XLA compilations, %d loaded from "
                "the persistent cache, %d programs skipped",
                self.built,
                name,
                self.seconds,
                self.compiled,
                self.cached,
                len(self.skipped_keys),
            )
        self.done.set()
        self._build_hits()

    def _build_hits(self) -> None:
        """Builds the programs of each prefix-cache hit that ran without them, one hit's at a
        time once the engine is idle, until stopped."""
        sampler = self.worker.engine.sampler
        while not self._stop.wait(POLL_SECONDS):
            if not sampler.hit_programs_waiting() or self._maps_full():
                continue
            if self._wait_idle() is None:
                return
            start, compiled = time.monotonic(), self.compiled
            built = self._build(PrefixHit())
            if built is None:
                return
            if built:
                self.hits_built += 1
                log.info(
                    "built the programs of a prefix-cache hit of %s in %.1f s (%d XLA "
                    "compilations)",
                    self.worker.base_model,
                    time.monotonic() - start,
                    self.compiled - compiled,
                )

    def _maps_full(self) -> bool:
        """Whether the process holds MAP_SHARE of its memory-map limit (logged the first
        time; from then on true: compiled programs keep their maps)."""
        if self.maps_full:
            return True
        usage = map_usage()
        if usage is None or usage[0] < MAP_SHARE * usage[1]:
            return False
        self.maps_full = True
        log.warning(
            "precompiling %s stopped after %d programs: the process holds %d memory maps of "
            "vm.max_map_count %d (each compiled program keeps some); the rest compile on first "
            "use. Raise the limit (sysctl -w vm.max_map_count=262144) to build more ahead",
            self.worker.base_model,
            self.built,
            *usage,
        )
        return True

    def _wait_idle(self) -> bool | None:
        """Waits until no user operation has been queued or running for IDLE_SECONDS; None
        when stopping."""
        idle_since = None
        while True:
            if self.worker.held() > 0:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= IDLE_SECONDS:
                return True
            if self._stop.wait(POLL_SECONDS):
                return None

    def _build(self, key: Key) -> bool | None:
        """Builds `key`'s programs on the engine thread and counts them: whether they could
        run (or failed: logged); None when stopping before they finished."""
        finished = threading.Event()
        outcome: dict[str, object] = {}

        def build() -> None:
            before = compilations(this_thread=True)
            try:
                outcome["built"] = self.worker.engine.call(calls.Precompile(key))
            finally:
                after = compilations(this_thread=True)
                self.compiled += after["compiled"] - before["compiled"]
                self.cached += after["cache"] - before["cache"]

        def fail(error: Exception) -> None:
            log.warning("precompiling %s failed: %s", key, error)
            finished.set()

        self.worker.submit(Callback(done=lambda _: finished.set(), fail=fail, fn=build))
        while not finished.wait(POLL_SECONDS):
            if self._stop.is_set():
                return None
        return bool(outcome.get("built"))
