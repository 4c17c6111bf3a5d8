"""Assembles a running server: store, engine workers, service core, front ends, janitor."""

from __future__ import annotations

import logging
import threading

from tinker_jax.service.config import ServerConfig
from tinker_jax.service.core import ServiceCore
from tinker_jax.service.grpc_server import start_grpc
from tinker_jax.service.store import Store
from tinker_jax.service.worker import EngineSettings, EngineWorker

log = logging.getLogger("tinker_jax.server")

SWEEP_INTERVAL_SECONDS = 30.0


class Server:
    """A started server; `stop` shuts it down cleanly."""

    def __init__(self, config: ServerConfig):
        self.config = config
        config.storage.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.storage)
        settings = EngineSettings(
            max_adapters=config.max_adapters,
            max_lora_rank=config.max_lora_rank,
            sampler_slots=config.sampler_slots,
            sampler_rows=config.sampler_rows,
            max_seq_len=config.max_seq_len,
            mesh=config.mesh,
            dtype=config.dtype,
            lora_alpha=config.lora_alpha,
            max_queue=config.max_queue,
        )
        self.workers = {}
        for name in config.base_models:
            log.info("loading %s", name)
            self.workers[name] = EngineWorker(name, settings)
        self.core = ServiceCore(config, self.store, self.workers)
        self.grpc, self.port = start_grpc(self.core, config.host, config.port)
        self._stopped = threading.Event()
        self._janitor = threading.Thread(target=self._sweep_loop, name="janitor", daemon=True)
        self._janitor.start()
        log.info(
            "serving %s on %s:%d (storage %s)",
            ", ".join(config.base_models),
            config.host,
            self.port,
            config.storage,
        )

    def _sweep_loop(self) -> None:
        while not self._stopped.wait(SWEEP_INTERVAL_SECONDS):
            try:
                self.core.sweep()
            except Exception:  # noqa: BLE001 - housekeeping must never stop the server
                log.exception("sweep failed")

    def wait(self) -> None:
        self._stopped.wait()

    def stop(self) -> None:
        self._stopped.set()
        self.grpc.stop(grace=2).wait()
        for worker in self.workers.values():
            worker.close()
        self.store.close()
