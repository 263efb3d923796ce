from pathlib import Path

import pytest
import torch

from pl_federated.store import ClientStore, all_finite, finite_rows, float_keys


def test_roles_allocate_lazily_and_round_trip_exactly():
    store = ClientStore(num_clients=4)
    assert store.roles == [] and store.nbytes() == 0
    states = {
        k: {
            "w": torch.randn(3, 2),
            "bn.running_mean": torch.randn(2),
            "bn.num_batches_tracked": torch.tensor(k),
        }
        for k in range(4)
    }
    for k, state in states.items():
        store.put("personal", k, state)
    assert store.roles == ["personal"]
    assert store.stacked("personal")["w"].shape == (4, 3, 2)
    for k, state in states.items():
        got = store.get("personal", k)
        for name in state:
            assert torch.equal(got[name], state[name])
            assert got[name].dtype == state[name].dtype


def test_get_returns_views_and_put_copies():
    store = ClientStore(num_clients=2)
    src = {"w": torch.ones(2)}
    store.put("model", 0, src)
    src["w"].add_(1)  # later changes to the source do not leak into the store
    assert store.get("model", 0)["w"].tolist() == [1.0, 1.0]
    store.get("model", 1)["w"].fill_(5)  # a view: writes go to the stacked tensor
    assert store.stacked("model")["w"][1].tolist() == [5.0, 5.0]


def test_written_flags_and_errors():
    store = ClientStore(num_clients=3)
    store.put("deputy", 2, {"w": torch.zeros(1)})
    assert store.has("deputy") and store.has("deputy", 2) and not store.has("deputy", 0)
    with pytest.raises(KeyError, match="'model'"):
        store.get("model", 0)
    with pytest.raises(IndexError):
        store.get("deputy", 3)
    with pytest.raises(ValueError, match="does not match"):
        store.put("deputy", 0, {"v": torch.zeros(1)})
    with pytest.raises(ValueError, match="num_clients"):
        ClientStore(num_clients=0)


def test_state_dict_round_trip_and_client_count_check():
    store = ClientStore(num_clients=3)
    for k in range(3):
        store.put("model", k, {"w": torch.full((2,), float(k))})
    restored = ClientStore(num_clients=3)
    restored.load_state_dict(store.state_dict())
    assert torch.equal(restored.stacked("model")["w"], store.stacked("model")["w"])
    assert restored.has("model", 1)
    with pytest.raises(ValueError, match="num_clients"):
        ClientStore(num_clients=4).load_state_dict(store.state_dict())


def test_owner_rank():
    store = ClientStore(num_clients=5)
    assert [store.owner(k, 2) for k in range(5)] == [0, 1, 0, 1, 0]
    assert store.owned(1, 2) == [1, 3]


def test_finite_helpers():
    state = {"a": torch.ones(2), "n": torch.tensor(3)}
    assert float_keys(state) == ["a"]
    assert all_finite(state.values())
    assert not all_finite([torch.tensor([1.0, float("nan")])])
    assert not all_finite([torch.tensor([float("inf")])])
    big = torch.tensor([3e38, 3e38, -1.0])  # finite, but its float32 sum overflows
    assert all_finite([big, torch.zeros(0), torch.tensor(1.0)])
    assert not all_finite([big, torch.tensor([float("-inf"), float("inf")])])
    halves = [torch.tensor([3e38]), torch.tensor([3e38])]  # each sum finite, their total not
    assert all_finite(halves) and not all_finite([*halves, torch.tensor([float("nan")])])


def test_finite_rows_per_client_row() -> None:
    a = torch.ones(4, 3, 2)
    b = torch.ones(4, 5, dtype=torch.float16)
    a[1, 2, 0] = float("nan")
    a[2] = 3e38  # finite; the row's float32 sum overflows and is re-checked exactly
    b[3, 1] = float("inf")
    ints = torch.zeros(4, 2, dtype=torch.long)
    assert finite_rows([a, b, ints], 4).tolist() == [True, False, True, False]


def test_half_precision_store_keeps_integers_exact():
    store = ClientStore(num_clients=2, dtype=torch.float16)
    store.put("model", 1, {"w": torch.tensor([1.0, 1 / 3]), "n": torch.tensor(7)})
    w, n = store.get("model", 1)["w"], store.get("model", 1)["n"]
    assert w.dtype == torch.float16 and n.dtype == torch.int64 and int(n) == 7
    assert abs(float(w[1]) - 1 / 3) < 1e-3
    with pytest.raises(ValueError, match="floating-point"):
        ClientStore(2, dtype=torch.int32)


def test_memory_mapped_store_round_trip(tmp_path):
    store = ClientStore(num_clients=3, path=tmp_path / "a")
    store.put("personal", 2, {"w": torch.arange(4.0).view(2, 2), "b": torch.ones(5)})
    files = sorted((tmp_path / "a").glob("*.bin"))
    assert [f.stat().st_size for f in files] == [3 * 4 * 4, 3 * 5 * 4]
    assert store.get("personal", 2)["w"].tolist() == [[0.0, 1.0], [2.0, 3.0]]
    again = ClientStore(num_clients=3, path=tmp_path / "b", dtype=torch.bfloat16)
    again.load_state_dict(store.state_dict())
    assert again.get("personal", 2)["b"].dtype == torch.bfloat16
    assert again.has("personal", 2) and not again.has("personal", 0)
    assert len(list((tmp_path / "b").glob("*.bin"))) == 2


def test_federation_with_a_half_precision_memory_mapped_store(trainer_factory, tmp_path):
    from helpers import digits, federation

    from pl_federated.callbacks import DeputyEnhancedTransfer

    def run(**store):
        fed = federation(local_epochs=3, persist_optimizer=True, **store)
        det = DeputyEnhancedTransfer(split="train")
        trainer_factory(rounds=2, callbacks=[det]).fit(fed, digits(3))
        return fed

    full = run()
    half = run(store_dtype="float16", store_path=str(tmp_path / "store"))
    personal = half.store.stacked("personal")
    assert all(t.dtype == torch.float16 for t in personal.values())
    assert list((tmp_path / "store").glob("*.bin"))
    a, b = full.history[-1]["personal/acc_mean"], half.history[-1]["personal/acc_mean"]
    assert abs(a - b) < 0.05
    with pytest.raises(ValueError, match="store_dtype"):
        federation(store_dtype="float64")


def _rss_mib() -> float:
    """This process's resident set (VmRSS) in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status")


def test_memory_mapped_store_releases_resident_pages_and_keeps_data(tmp_path):
    store = ClientStore(num_clients=64, path=tmp_path / "m")
    row = torch.arange(2**18, dtype=torch.float32)  # 1 MiB per client
    for k in range(64):
        store.put("model", k, {"w": row + k})
    before = _rss_mib()
    store.release_memory()
    assert before - _rss_mib() > 48  # the 64 MiB of written rows left the resident set
    assert all(torch.equal(store.get("model", k)["w"], row + k) for k in (0, 31, 63))
    ram = ClientStore(num_clients=2)
    ram.put("model", 0, {"w": row})
    ram.release_memory()  # no-op in RAM
    assert torch.equal(ram.get("model", 0)["w"], row)


def test_put_rows_writes_a_subset_of_entries() -> None:
    store = ClientStore(num_clients=4)
    store.allocate("server", {"w": torch.zeros(2), "b": torch.zeros(1)})
    store.put_rows("server", [3, 1], {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])})
    assert store.get("server", 3)["w"].tolist() == [1.0, 2.0]
    assert store.get("server", 1)["w"].tolist() == [3.0, 4.0]
    assert store.get("server", 1)["b"].tolist() == [0.0]  # not given: kept
    assert store.has("server", 1) and not store.has("server", 0)
    with pytest.raises(ValueError, match="keys"):
        store.put_rows("server", [0], {"other": torch.zeros(1, 2)})
