"""tinker-cookbook 0.6.1, unmodified, against our server (issue #16): the `rl_loop` recipe's
`main` and the cookbook's RL trainer `tinker_cookbook.rl.train.main` (sync with its default
`importance_sampling` loss and with `stable_reinforce`; async, two steps off-policy, with its
default `stable_reinforce`), each for two steps on the shared server's tiny random qwen3 with
LoRA rank 8, through the official SDK over HTTP.

Nothing is downloaded: the recipe's GSM8K load is answered by an in-memory `datasets` table, the
tokenizer is the model folder's own, prompts use the `role_colon` renderer (any tokenizer) and
the trainer's task is the in-memory one in tests/cookbook_env.py. The cookbook's start-up fetch
of a pricing table is answered as the cookbook answers a failed fetch (no prices).

Every run is checked through what the cookbook itself leaves behind (its metrics.jsonl and
checkpoints.jsonl), through the forward_backward calls it made (a spy on the SDK's
`TrainingClient.forward_backward` that records the loss, the data and the result) and through
the server: the final sampler weights score a fixed sequence differently from the base model,
so the steps really trained."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.server_process import ServerProcess

tinker = pytest.importorskip("tinker")
pytest.importorskip(
    "tinker_cookbook",
    reason="tinker-cookbook 0.6.1 goes in with `pip install --no-deps` (.ci/run does it)",
)
datasets = pytest.importorskip("datasets")

from tinker_cookbook import checkpoint_utils  # noqa: E402
from tinker_cookbook.recipes import rl_loop  # noqa: E402
from tinker_cookbook.rl import train  # noqa: E402

from tests.cookbook_env import RENDERER, EvenTokenDatasetBuilder  # noqa: E402

TIMEOUT = 300
STEPS = 2
GROUP_SIZE = 4
MAX_TOKENS = 8
LORA_RANK = 8
# Large for real training, so that two steps of a tiny model move its logprobs visibly.
LEARNING_RATE = 1e-2
# A fixed sequence the base model and the trained weights both score.
PROBE = list(range(2, 26))


@pytest.fixture(scope="module")
def server(shared_server: ServerProcess) -> ServerProcess:
    """The shared server as this module sees it: one user of its own."""
    return shared_server.with_users("cookbook", "alice")


@pytest.fixture(autouse=True)
def offline_cookbook(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cookbook as a researcher configures it for our server (the key in TINKER_API_KEY, as
    its ServiceClients read it), with every network source of its own closed: the HF hub and
    datasets are offline, and its pricing fetch (tinker_cookbook.utils.cost_estimation) answers
    as after a failed download, so a machine without network neither waits nor differs."""
    monkeypatch.setenv("TINKER_API_KEY", server.keys["alice"])
    monkeypatch.setenv("TINKER_BASE_URL", server.http_url)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(train, "fetch_model_pricing", lambda model_name, **kwargs: None)


@pytest.fixture(autouse=True)
def close_sessions(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every `tinker.ServiceClient` made during the test (the recipe's `main` never closes its
    own) is closed afterwards, so its session's runs and samplers leave the server's adapter
    slots to the other modules that share it. `close` is idempotent."""
    opened: list[Any] = []

    class ClosingServiceClient(tinker.ServiceClient):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(tinker, "ServiceClient", ClosingServiceClient)
    yield
    for client in opened:
        client.close("success").result(timeout=TIMEOUT)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The cookbook replaces the root logger's handlers with its own (console and its log
    folder's logs.log) and sets its level; the root logger is put back as it was after the
    test, so later modules neither print nor write into this test's folder."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@dataclass
class ForwardBackwardCall:
    """One `TrainingClient.forward_backward` call the cookbook made."""

    loss_fn: str
    data: list[Any]
    future: Any


@dataclass
class ForwardBackwardSpy:
    """Records the cookbook's forward_backward calls; the calls themselves go through."""

    calls: list[ForwardBackwardCall] = field(default_factory=list)

    def results(self) -> list[Any]:
        """The calls' results (each already awaited by the cookbook)."""
        return [call.future.result(timeout=TIMEOUT) for call in self.calls]


@pytest.fixture
def forward_backward_spy(monkeypatch: pytest.MonkeyPatch) -> ForwardBackwardSpy:
    """Wraps the SDK's `TrainingClient.forward_backward` for the test: each call is recorded
    (loss, data, future) and passed on unchanged."""
    spy = ForwardBackwardSpy()
    original = tinker.TrainingClient.forward_backward

    def forward_backward(
        self: Any, data: list[Any], loss_fn: str, loss_fn_config: Any = None
    ) -> Any:
        future = original(self, data, loss_fn, loss_fn_config)
        spy.calls.append(ForwardBackwardCall(loss_fn, list(data), future))
        return future

    monkeypatch.setattr(tinker.TrainingClient, "forward_backward", forward_backward)
    return spy


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _final_sampler_path(log_path: Path) -> str:
    """The sampler weights of the run's final checkpoint, as the cookbook recorded them."""
    final = [c for c in checkpoint_utils.load_checkpoints_file(str(log_path)) if c.name == "final"]
    assert len(final) == 1 and final[0].sampler_path, final
    return final[0].sampler_path


def _assert_trained(server: ServerProcess, sampler_path: str) -> None:
    """The weights at `sampler_path` score PROBE differently from the base model: the run's
    optimizer steps changed the adapter (a LoRA adapter starts as the identity)."""
    prompt = tinker.ModelInput.from_ints(PROBE)
    with tinker.ServiceClient(base_url=server.http_url, api_key=server.keys["alice"]) as service:
        base = service.create_sampling_client(base_model=server.model).result(timeout=TIMEOUT)
        trained = service.create_sampling_client(model_path=sampler_path).result(timeout=TIMEOUT)
        before = np.array(base.compute_logprobs(prompt).result(timeout=TIMEOUT)[1:], np.float64)
        after = np.array(trained.compute_logprobs(prompt).result(timeout=TIMEOUT)[1:], np.float64)
    assert np.isfinite(after).all()
    assert np.abs(after - before).max() > 1e-3, "the trained weights score like the base model"


def _assert_finite_losses(spy: ForwardBackwardSpy, loss_fn: str) -> None:
    """Every forward_backward the run made used `loss_fn` and returned a finite loss and finite
    per-token logprobs, one output per datum."""
    assert spy.calls, "the run made no forward_backward call"
    assert {call.loss_fn for call in spy.calls} == {loss_fn}
    for call, result in zip(spy.calls, spy.results(), strict=True):
        assert math.isfinite(result.metrics["loss:sum"]), result.metrics
        assert len(result.loss_fn_outputs) == len(call.data)
        for output in result.loss_fn_outputs:
            assert np.isfinite(output["logprobs"].to_numpy()).all()
        if loss_fn == "stable_reinforce":
            # the cookbook names the sampled sequence behind every datum
            assert all(d.loss_fn_input_spans for d in call.data)


# ------------------------------------------------------------------ the rl_loop recipe


def _letters_reward(response: str, answer: str) -> float:
    """The recipe's reward slot, for replies of a random model: the share of the reply's
    characters that occur in `answer` (0.0 for an empty reply). Unlike GSM8K grading it varies
    within a group, so the recipe keeps the groups and trains."""
    if not response:
        return 0.0
    return sum(1 for ch in response if ch in answer) / len(response)


# The importance_sampling variants run in .ci/run's second step (`pytest -m slow`): the default
# suite keeps the stable_reinforce ones, which the cookbook runs by default.
SLOW_IS = pytest.param("importance_sampling", marks=pytest.mark.slow)


@pytest.mark.parametrize("loss_fn", [SLOW_IS, "stable_reinforce"])
def test_rl_loop_recipe(
    server: ServerProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    forward_backward_spy: ForwardBackwardSpy,
    loss_fn: str,
) -> None:
    """`tinker_cookbook.recipes.rl_loop.main`, unmodified, for two batches of two questions:
    its sampling (`save_weights_and_get_sampling_client(record_stability_info=...)` then one
    `sample` of GROUP_SIZE per question), its datum construction (with `with_sampled_provenance`
    for stable_reinforce), `forward_backward` + `optim_step` and its final checkpoint. Only its
    inputs are replaced: GSM8K by an in-memory table, the model registry's renderer choice by
    role_colon (our model folder is not in the registry) and GSM8K grading by a reward a random
    model's replies can earn."""

    def load_dataset(path: str, name: str | None = None, **kwargs: Any) -> Any:
        assert (path, name) == ("openai/gsm8k", "main")
        questions = ["the quick brown fox", "hello world", "tinker jax", "the lazy dog"]
        table = {"question": questions, "answer": ["the quick brown fox jumps #### 4"] * 4}
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(table)})

    monkeypatch.setattr(rl_loop.datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(rl_loop.model_info, "get_recommended_renderer_name", lambda _: RENDERER)
    monkeypatch.setattr(rl_loop, "get_reward", _letters_reward)
    sample_calls: list[bool] = []
    original_save = tinker.TrainingClient.save_weights_and_get_sampling_client

    def save_weights_and_get_sampling_client(self, *args: Any, **kwargs: Any) -> Any:
        sample_calls.append(kwargs.get("record_stability_info", False))
        return original_save(self, *args, **kwargs)

    monkeypatch.setattr(
        tinker.TrainingClient,
        "save_weights_and_get_sampling_client",
        save_weights_and_get_sampling_client,
    )

    config = rl_loop.Config(
        base_url=server.http_url,
        log_path=str(tmp_path / "rl_loop"),
        model_name=server.model,
        batch_size=2,
        group_size=GROUP_SIZE,
        learning_rate=LEARNING_RATE,
        lora_rank=LORA_RANK,
        save_every=0,
        max_tokens=MAX_TOKENS,
        loss_fn=loss_fn,
        max_steps=STEPS,
    )
    rl_loop.main(config)

    assert sample_calls == [loss_fn == "stable_reinforce"] * STEPS
    _assert_finite_losses(forward_backward_spy, loss_fn)
    # two questions x GROUP_SIZE samples per step, less the groups whose rewards were all equal
    assert all(0 < len(call.data) <= 2 * GROUP_SIZE for call in forward_backward_spy.calls)
    metrics = _read_jsonl(tmp_path / "rl_loop" / "metrics.jsonl")
    assert [row["step"] for row in metrics] == list(range(STEPS))
    assert all(0.0 <= row["reward/total"] <= 1.0 for row in metrics)
    _assert_trained(server, _final_sampler_path(tmp_path / "rl_loop"))


# ------------------------------------------------------------------ rl.train


def _train_config(server: ServerProcess, log_path: Path, **overrides: Any) -> train.Config:
    """The cookbook's RL Config for the in-memory task: STEPS batches of two groups of
    GROUP_SIZE, MAX_TOKENS per reply, no W&B, no evals, no periodic checkpoints (the final one
    is always saved)."""
    builder = EvenTokenDatasetBuilder(
        model_name=server.model, batch_size=2, group_size=GROUP_SIZE, num_batches=STEPS + 1
    )
    return train.Config(
        learning_rate=LEARNING_RATE,
        dataset_builder=builder,
        model_name=server.model,
        recipe_name="tinker_jax_test",
        max_tokens=MAX_TOKENS,
        log_path=str(log_path),
        eval_every=0,
        save_every=0,
        renderer_name=RENDERER,
        lora_rank=LORA_RANK,
        base_url=server.http_url,
        max_steps=STEPS,
        num_groups_to_log=0,
        **overrides,
    )


def _assert_run_logged(log_path: Path) -> list[dict[str, Any]]:
    """The cookbook logged STEPS training steps, each with its progress, reward and trained
    token count, then its cumulative token totals at step STEPS, and saved a final checkpoint
    after the last step. Returns the steps' rows."""
    metrics = _read_jsonl(log_path / "metrics.jsonl")
    steps = [row for row in metrics if "progress/done_frac" in row]
    assert [row["step"] for row in steps] == list(range(STEPS))
    assert [row["progress/done_frac"] for row in steps] == [(i + 1) / STEPS for i in range(STEPS)]
    for row in steps:
        assert 0.0 <= row["env/all/reward/total"] <= 1.0, row
        assert row["env/all/total_episodes"] == 2 * GROUP_SIZE, row
        assert row["tokens/trained"] > 0, row
    assert max(row["step"] for row in metrics) == STEPS
    final = checkpoint_utils.get_last_checkpoint(str(log_path))
    assert final is not None and final.name == "final" and final.batch == STEPS
    return steps


@pytest.mark.parametrize("loss_fn", [SLOW_IS, "stable_reinforce"])
def test_rl_train_sync(
    server: ServerProcess,
    tmp_path: Path,
    forward_backward_spy: ForwardBackwardSpy,
    loss_fn: str,
) -> None:
    """`tinker_cookbook.rl.train.main` in its synchronous mode, with its default loss
    (importance_sampling) and with stable_reinforce (sampling then records stability info and
    every datum carries provenance): two steps complete, each one forward_backward with a
    finite loss, and the final weights differ from the base model."""
    log_path = tmp_path / "run"
    overrides = {} if loss_fn == "importance_sampling" else {"loss_fn": loss_fn}
    config = _train_config(server, log_path, **overrides)
    assert config.training_loss_fn() == loss_fn
    asyncio.run(train.main(config))

    _assert_run_logged(log_path)
    _assert_finite_losses(forward_backward_spy, loss_fn)
    assert len(forward_backward_spy.calls) == STEPS
    assert all(len(call.data) == 2 * GROUP_SIZE for call in forward_backward_spy.calls)
    _assert_trained(server, _final_sampler_path(log_path))


def test_rl_train_async(
    server: ServerProcess, tmp_path: Path, forward_backward_spy: ForwardBackwardSpy
) -> None:
    """`tinker_cookbook.rl.train.main` in its async off-policy mode (sampling may run up to
    two steps ahead of training) with the AsyncConfig's default loss, stable_reinforce: two
    steps of two groups complete and train, on data at most two steps stale."""
    log_path = tmp_path / "run"
    config = _train_config(
        server,
        log_path,
        async_config=train.AsyncConfig(max_steps_off_policy=2, groups_per_batch=2),
    )
    assert config.training_loss_fn() == "stable_reinforce"
    asyncio.run(train.main(config))

    steps = _assert_run_logged(log_path)
    assert all(0 <= row["async/staleness_max"] <= 2 for row in steps)
    _assert_finite_losses(forward_backward_spy, "stable_reinforce")
    assert len(forward_backward_spy.calls) == STEPS
    _assert_trained(server, _final_sampler_path(log_path))
