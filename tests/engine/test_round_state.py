"""Declared round state: reset, and the merge of every reduction across (simulated) ranks."""

import pytest
import torch

from pl_federated.engine.round_state import RoundState, merge_round_states, merge_values


def test_reset_gives_fresh_copies_of_the_defaults():
    state = RoundState()
    state.add("seen", [], reduce="cat")
    state.add("sums", {}, reduce="sum")
    state.seen.append(1)
    state.sums["a"] = 2.0
    state.reset()
    assert state.seen == [] and state.sums == {}
    with pytest.raises(ValueError, match="declared twice"):
        state.add("seen", [])
    with pytest.raises(ValueError, match="`reduce` must be one of"):
        state.add("other", 0, reduce="mean")


def test_each_reduction_merges_as_documented():
    assert merge_values("sum", [1.0, 2.5]) == 3.5
    summed = merge_values("sum", [{"a": torch.tensor(1.0)}, {"a": torch.tensor(2.0), "b": 3}])
    assert float(summed["a"]) == 3.0 and summed["b"] == 3
    assert merge_values("cat", [[3, 1], [2]]) == [3, 1, 2]
    assert list(merge_values("gather", [{5: "x"}, {1: "y"}])) == [1, 5]
    assert merge_values("local", ["mine", "yours"]) == "mine"


def test_merge_round_states_in_one_gather_as_two_ranks_would():
    """Two ranks' states merged with a fake all-gather equal one state that saw everything."""

    class Owner:
        pass

    def make(rank_clients):
        owner = Owner()
        state = RoundState(target=owner)
        state.add("uploads", {}, reduce="gather")
        state.add("count", 0, reduce="sum")
        state.add("flag", False, reduce="local")
        for c in rank_clients:
            owner.uploads[c] = torch.full((2,), float(c))
            owner.count += 1
        return owner, state

    (a, sa), (b, sb) = make([0, 2]), make([1])
    b.flag = True
    parts = [[sa.local_values()], [sb.local_values()]]
    merge_round_states([sa], lambda obj: parts)
    assert list(a.uploads) == [0, 1, 2] and a.count == 3 and a.flag is False
    assert torch.equal(a.uploads[1], torch.ones(2))
    # one process: the gather returns its own values, nothing changes
    (c, sc) = make([4])
    merge_round_states([sc], lambda obj: [obj])
    assert list(c.uploads) == [4] and c.count == 1
