"""The bounded DAPO sampler on an in-memory TransferQueue: it ends, and filters while it may."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from omegaconf import OmegaConf

replay_buffer = pytest.importorskip("verl.trainer.ppo.v1.replay_buffer")
from recipe.retool.verl_plugins.dapo_sampler import PREFIX, BoundedDAPOReplayBuffer  # noqa: E402


class FakeTransferQueue:
    """Prompts finish as soon as they are submitted; each group's ``acc`` values come from
    ``scores(uid_number)``. Only the calls the replay buffer makes are implemented."""

    def __init__(self, scores: Callable[[int], list[float]]) -> None:
        self.scores = scores
        self.items: dict[str, dict] = {}
        self.counter = itertools.count()
        self.submitted = 0

    def submit(self, n: int) -> int:
        for _ in range(n):
            uid = f"p{next(self.counter)}"
            self.items[uid] = {"is_prompt": True, "status": "finished", "global_steps": 1}
            for i, acc in enumerate(self.scores(int(uid[1:]))):
                self.items[f"{uid}_{i}"] = {"acc": acc}
        self.submitted += n
        return n

    def kv_list(self):
        return {"train": {k: dict(v) for k, v in self.items.items()}}

    def kv_batch_get(self, keys, partition_id, select_fields):
        rows = [{"reward_extra_info": {"acc": self.items[k]["acc"]}} for k in keys]
        return {"extra_fields": rows}

    def kv_clear(self, partition_id, keys):
        for key in keys:
            self.items.pop(key, None)


def make_buffer(monkeypatch, fake: FakeTransferQueue, **filter_groups) -> BoundedDAPOReplayBuffer:
    monkeypatch.setattr(replay_buffer, "tq", fake)
    cfg = OmegaConf.create(
        {
            "algorithm": {"filter_groups": {"enable": True, "metric": "acc", **filter_groups}},
            "sampler_kwargs": {
                "enable": "${algorithm.filter_groups.enable}",
                "metric": "${algorithm.filter_groups.metric}",
                "max_num_gen_batches": "${algorithm.filter_groups.max_num_gen_batches}",
            },
        }
    )
    return BoundedDAPOReplayBuffer(
        trainer_mode="sync",
        trainer_config=OmegaConf.create({}),
        max_off_policy_threshold=None,
        max_off_policy_strategy="drop",
        sampler_kwargs=cfg.sampler_kwargs,
        poll_interval=0.0,
        refill_fn=fake.submit,
    )


def test_all_groups_alike_ends_after_the_budget(monkeypatch):
    fake = FakeTransferQueue(lambda n: [0.0, 0.0])  # nothing ever differs: the spin verl has
    buffer = make_buffer(monkeypatch, fake, max_num_gen_batches=3)
    fake.submit(4)  # what the trainer's prepare_step does
    batch, metrics = buffer.sample(global_steps=1, partition_id="train", batch_size=4)
    assert len({k.split("_")[0] for k in batch.keys}) == 4
    assert metrics[f"{PREFIX}/budget_exhausted"] == 1
    assert 12 <= fake.submitted <= 16  # 3 batches of 4, then one to fill the batch
    assert metrics[f"{PREFIX}/generated_prompts"] == fake.submitted


def test_groups_with_signal_are_kept_and_alike_ones_dropped(monkeypatch):
    fake = FakeTransferQueue(lambda n: [0.0, 1.0] if n % 2 else [1.0, 1.0])
    buffer = make_buffer(monkeypatch, fake, max_num_gen_batches=10)
    fake.submit(4)
    batch, metrics = buffer.sample(global_steps=1, partition_id="train", batch_size=4)
    uids = {k.split("_")[0] for k in batch.keys}
    assert len(uids) == 4 and all(int(u[1:]) % 2 for u in uids)
    assert metrics[f"{PREFIX}/budget_exhausted"] == 0
    assert metrics[f"{PREFIX}/evicted_samples"] >= 2


def test_disabled_filter_takes_verls_path(monkeypatch):
    fake = FakeTransferQueue(lambda n: [0.0, 0.0])
    buffer = make_buffer(monkeypatch, fake, max_num_gen_batches=1, enable=False)
    assert buffer.filter_groups_metric is None
