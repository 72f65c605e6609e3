"""The bounded DAPO sampler on an in-memory TransferQueue: it ends, and filters while it may."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from omegaconf import OmegaConf

replay_buffer = pytest.importorskip("verl.trainer.ppo.v1.replay_buffer")
from recipe.retool.verl_plugins.dapo_sampler import (  # noqa: E402
    CONTROL_PREFIX,
    PREFIX,
    BoundedDAPOReplayBuffer,
    shuffle_rewards,
)


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
                # the reward on the last of a few response tokens, as verl's managers put it
                reward = torch.zeros(3 + i)
                reward[-1] = 2 * acc - 1
                self.items[f"{uid}_{i}"] = {"acc": acc, "rm_scores": reward}
        self.submitted += n
        return n

    def kv_list(self):
        tags = {k: {t: x for t, x in v.items() if t != "rm_scores"} for k, v in self.items.items()}
        return {"train": tags}

    def kv_batch_get(self, keys, partition_id, select_fields):
        if select_fields == ["rm_scores"]:
            rows = [self.items[k]["rm_scores"] for k in keys]
            return {"rm_scores": torch.nested.as_nested_tensor(rows, layout=torch.jagged)}
        rows = [{"reward_extra_info": {"acc": self.items[k]["acc"]}} for k in keys]
        return {"extra_fields": rows}

    def kv_batch_put(self, keys, partition_id, fields):
        for key, value in zip(keys, fields["rm_scores"].unbind(), strict=True):
            self.items[key]["rm_scores"] = value

    def kv_clear(self, partition_id, keys):
        for key in keys:
            self.items.pop(key, None)


def make_buffer(
    monkeypatch, fake: FakeTransferQueue, shuffle_seed: int | None = None, **filter_groups
) -> BoundedDAPOReplayBuffer:
    monkeypatch.setattr(replay_buffer, "tq", fake)
    control = {} if shuffle_seed is None else {"shuffle_rewards_seed": shuffle_seed}
    cfg = OmegaConf.create(
        {
            "algorithm": {"filter_groups": {"enable": True, "metric": "acc", **filter_groups}},
            "sampler_kwargs": {
                "enable": "${algorithm.filter_groups.enable}",
                "metric": "${algorithm.filter_groups.metric}",
                "max_num_gen_batches": "${algorithm.filter_groups.max_num_gen_batches}",
                **control,
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


def totals(fake: FakeTransferQueue, keys) -> list[float]:
    return [float(fake.items[k]["rm_scores"].sum()) for k in keys]


def test_control_shuffles_rewards_across_the_batch_and_keeps_their_distribution(monkeypatch):
    fake = FakeTransferQueue(lambda n: [0.0, 1.0, 1.0, 0.0] if n % 2 else [1.0, 0.0, 0.0, 0.0])
    buffer = make_buffer(monkeypatch, fake, shuffle_seed=7, max_num_gen_batches=10)
    fake.submit(8)
    keys = sorted(k for k in fake.items if "_" in k)
    before = dict(zip(keys, totals(fake, keys), strict=True))
    batch, metrics = buffer.sample(global_steps=1, partition_id="train", batch_size=8)
    after = dict(zip(batch.keys, totals(fake, batch.keys), strict=True))
    assert sorted(after.values()) == sorted(before[k] for k in batch.keys)  # a permutation
    assert after != {k: before[k] for k in batch.keys}  # ... that moved rewards
    assert 0 < metrics[f"{CONTROL_PREFIX}/moved_rewards"] <= 1
    for key in batch.keys:  # each reward sits on its trajectory's last token, nothing else
        reward = fake.items[key]["rm_scores"]
        assert reward.shape == (3 + int(key.split("_")[1]),) and not reward[:-1].any()


def test_without_a_control_seed_rewards_are_untouched(monkeypatch):
    fake = FakeTransferQueue(lambda n: [0.0, 1.0])
    buffer = make_buffer(monkeypatch, fake, max_num_gen_batches=10)
    fake.submit(4)
    keys = sorted(k for k in fake.items if "_" in k)
    before = totals(fake, keys)
    _, metrics = buffer.sample(global_steps=1, partition_id="train", batch_size=4)
    assert totals(fake, keys) == before and f"{CONTROL_PREFIX}/moved_rewards" not in metrics


def test_validation_batches_are_never_shuffled(monkeypatch):
    fake = FakeTransferQueue(lambda n: [0.0, 1.0])
    buffer = make_buffer(monkeypatch, fake, shuffle_seed=1, max_num_gen_batches=10)
    calls = []
    monkeypatch.setattr(buffer, "_sample_groups", lambda *a: calls.append(a) or ("batch", {}))
    assert buffer.sample(global_steps=1, partition_id="val", batch_size=4) == ("batch", {})
    assert calls == [(1, "val", 4)]


def test_shuffle_rewards_is_a_seeded_permutation():
    import random

    rows = [torch.tensor([0.0, 0.0, v]) for v in (1.0, -1.0, 0.5, 0.0)]
    first = shuffle_rewards(rows, random.Random(3))
    again = shuffle_rewards(rows, random.Random(3))
    assert [float(r.sum()) for r in first] == [float(r.sum()) for r in again]
    assert sorted(float(r.sum()) for r in first) == [-1.0, 0.0, 0.5, 1.0]
