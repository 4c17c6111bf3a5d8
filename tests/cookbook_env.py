"""A tiny in-memory RL task written against tinker-cookbook's interfaces
(`tinker_cookbook.rl.types`) so that the cookbook's own training loop
(`tinker_cookbook.rl.train.main`) can run against our server with no data set download: one-turn
prompts rendered with the `role_colon` renderer (which works with any tokenizer, so with the
tests' tiny BPE one) and a reward computed from the sampled token ids alone.

The reward is the share of the reply's tokens that lie in a fixed half of the vocabulary (the
even ids). It is deliberately not all-or-nothing: a tiny random model's replies in one group
almost never all earn the same share, so the groups carry non-zero advantages and every step
really trains."""

from __future__ import annotations

from collections.abc import Sequence

import chz
import tinker
from tinker_cookbook import renderers
from tinker_cookbook.completers import StopCondition
from tinker_cookbook.rl.types import (
    Action,
    ActionExtra,
    Env,
    EnvGroupBuilder,
    RLDataset,
    RLDatasetBuilder,
    StepResult,
)
from tinker_cookbook.tokenizer_utils import get_tokenizer

RENDERER = "role_colon"
QUESTIONS = (
    "the quick brown fox",
    "hello world",
    "tinker jax",
    "the lazy dog",
    "jumps over",
    "brown dog",
)


def reward_for(tokens: Sequence[int]) -> float:
    """The share of `tokens` with an even id; 0.0 for an empty reply (a first-token EOS)."""
    if not tokens:
        return 0.0
    return sum(1 for token in tokens if token % 2 == 0) / len(tokens)


class EvenTokenEnv(Env):
    """One turn: the user's question is rendered as a generation prompt, the model replies once
    and the episode ends with `reward_for(reply)`."""

    def __init__(self, question: str, renderer: renderers.Renderer):
        self.question = question
        self.renderer = renderer

    async def initial_observation(self) -> tuple[tinker.ModelInput, StopCondition]:
        prompt = self.renderer.build_generation_prompt([{"role": "user", "content": self.question}])
        return prompt, self.renderer.get_stop_sequences()

    async def step(self, action: Action, *, extra: ActionExtra | None = None) -> StepResult:
        return StepResult(
            reward=reward_for(action),
            episode_done=True,
            next_observation=tinker.ModelInput.empty(),
            next_stop_condition=self.renderer.get_stop_sequences(),
            metrics={"even_share": reward_for(action)},
        )


class EvenTokenGroupBuilder(EnvGroupBuilder):
    """`group_size` copies of one question's env (GRPO-style groups). It holds only strings and
    ints, as the cookbook asks (builders may be pickled to rollout workers); the tokenizer and
    renderer are made in `make_envs`."""

    def __init__(self, question: str, group_size: int, model_name: str):
        self.question = question
        self.group_size = group_size
        self.model_name = model_name

    async def make_envs(self) -> Sequence[Env]:
        renderer = renderers.get_renderer(RENDERER, get_tokenizer(self.model_name))
        return [EvenTokenEnv(self.question, renderer) for _ in range(self.group_size)]

    def logging_tags(self) -> list[str]:
        return ["even_token"]


class EvenTokenDataset(RLDataset):
    """`num_batches` batches of `batch_size` groups, cycling through QUESTIONS."""

    def __init__(self, model_name: str, batch_size: int, group_size: int, num_batches: int):
        self.model_name = model_name
        self.batch_size = batch_size
        self.group_size = group_size
        self.num_batches = num_batches

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        first = index * self.batch_size
        return [
            EvenTokenGroupBuilder(
                QUESTIONS[(first + i) % len(QUESTIONS)], self.group_size, self.model_name
            )
            for i in range(self.batch_size)
        ]

    def __len__(self) -> int:
        return self.num_batches


@chz.chz
class EvenTokenDatasetBuilder(RLDatasetBuilder):
    """The cookbook's dataset entry point for `Config.dataset_builder`: a training set only
    (no test set, so the cookbook adds no evaluator)."""

    model_name: str
    batch_size: int = 2
    group_size: int = 4
    num_batches: int = 2

    async def __call__(self) -> tuple[RLDataset, RLDataset | None]:
        dataset = EvenTokenDataset(
            self.model_name, self.batch_size, self.group_size, self.num_batches
        )
        return dataset, None
