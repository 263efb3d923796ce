"""LEAF JSON and CSV/Parquet tables as natural partitions, on small files the tests write."""

import csv
import json

import lightning.pytorch as pl
import pytest
import torch
from helpers import federation
from torch import nn
from torch.nn import functional as F

from pl_federated import ClientDatasets
from pl_federated.callbacks import FedAvg
from pl_federated.data.natural import LEAF_CHARACTERS, encode_characters, read_leaf
from pl_federated.models import MLPClassifier
from pl_federated.validation import ConfigError


def _write_leaf(folder, users, name="part.json"):
    """``users``: user -> (xs, ys), written as one LEAF JSON file."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "users": list(users),
        "num_samples": [len(ys) for _, ys in users.values()],
        "user_data": {u: {"x": xs, "y": ys} for u, (xs, ys) in users.items()},
    }
    (folder / name).write_text(json.dumps(data))


def _femnist_like(tmp_path, users=("f0002_31", "f0000_14", "f0001_07")):
    """LEAF's FEMNIST layout: train/ and test/ folders, 16-pixel images, 3 classes."""
    g = torch.Generator().manual_seed(0)
    written = {}
    for split, n in (("train", 12), ("test", 4)):
        split_users = {}
        for k, user in enumerate(users):
            xs = torch.rand(n, 16, generator=g).tolist()
            ys = [(i + k) % 3 for i in range(n)]
            split_users[user] = (xs, ys)
        half = dict(list(split_users.items())[:2]), dict(list(split_users.items())[2:])
        _write_leaf(tmp_path / split, half[0], "a.json")  # users spread over two files
        _write_leaf(tmp_path / split, half[1], "b.json")
        written[split] = split_users
    return written


def test_leaf_with_train_and_test_folders_keeps_their_split(tmp_path):
    written = _femnist_like(tmp_path)
    dm = ClientDatasets.from_leaf(tmp_path, input_shape=(1, 4, 4), batch_size=4)
    dm.setup("fit")
    assert dm.client_names == ["f0000_14", "f0001_07", "f0002_31"]
    assert dm.num_train.tolist() == [12, 12, 12] and dm.num_test.tolist() == [4, 4, 4]
    xs, ys = written["test"]["f0001_07"]
    torch.testing.assert_close(dm.test_x[1], torch.tensor(xs).reshape(4, 1, 4, 4))
    assert dm.test_y[1].tolist() == ys
    x0, y0 = dm.train_sets[0][5]
    assert x0.shape == (1, 4, 4)  # one of the user's own samples (the order is shuffled)
    xs, ys = written["train"]["f0000_14"]
    assert [int(y0)] == [
        y for x, y in zip(xs, ys, strict=True) if torch.equal(torch.tensor(x), x0.flatten())
    ]
    assert dm.num_classes == 3


def test_leaf_trains_a_federation(tmp_path, trainer_factory):
    _femnist_like(tmp_path)
    dm = ClientDatasets.from_leaf(tmp_path, input_shape=(1, 4, 4), batch_size=4, val_fraction=0.25)
    torch.manual_seed(0)
    fed = federation(MLPClassifier(input_size=16, num_classes=3), local_steps=2)
    trainer_factory(rounds=2, callbacks=[FedAvg()]).fit(fed, dm)
    assert dm.num_train.tolist() == [9, 9, 9] and dm.num_val.tolist() == [3, 3, 3]
    assert 0.0 <= fed.history[-1]["global/acc"] <= 1.0
    assert fed.trainer.global_step == 2 * 3 * 2


class CharModel(pl.LightningModule):
    """Next-character prediction: embeddings of a window, averaged, then a linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(len(LEAF_CHARACTERS), 8)
        self.head = nn.Linear(8, len(LEAF_CHARACTERS))

    def forward(self, x):
        return self.head(self.embed(x).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_shakespeare_text_is_encoded_as_leaf_characters_and_trains(tmp_path, trainer_factory):
    lines = "To be, or not to be: that is the question. Whether 'tis nobler in the mind"
    users = {}
    for k, role in enumerate(("HAMLET", "OPHELIA")):
        windows = [lines[i + k : i + k + 8] for i in range(0, 40, 2)]
        users[role] = (windows, [lines[i + k + 8] for i in range(0, 40, 2)])
    _write_leaf(tmp_path, users)  # one folder: split by test_fraction
    read = read_leaf(tmp_path)
    assert read["HAMLET"][0][0].tolist() == encode_characters("To be, o").tolist()
    assert int(read["HAMLET"][1][0]) == LEAF_CHARACTERS.index("r")
    dm = ClientDatasets.from_leaf(
        tmp_path, test_fraction=0.25, batch_size=5, num_classes=len(LEAF_CHARACTERS)
    )
    torch.manual_seed(0)
    fed = federation(CharModel(), local_epochs=1)
    trainer_factory(rounds=2, callbacks=[FedAvg()]).fit(fed, dm)
    assert dm.client_names == ["HAMLET", "OPHELIA"]
    assert dm.num_train.tolist() == [15, 15] and dm.num_test.tolist() == [5, 5]
    assert dm.num_classes == 80


def test_leaf_values_it_cannot_encode_name_the_fix(tmp_path):
    tweet = ["1467810369", "Mon Apr 06", "NO_QUERY", "user", "is upset that he can't"]
    _write_leaf(tmp_path, {"u1": ([tweet], [0])})
    with pytest.raises(ConfigError, match="pass `encode_x`"):
        read_leaf(tmp_path)
    words = read_leaf(tmp_path, encode_x=lambda x: torch.tensor([len(x[4].split())]))
    assert words["u1"][0].tolist() == [[5]]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"users": ["a"]}, "not a LEAF file"),
        ({"users": ["a"], "num_samples": [3], "user_data": {"a": {"x": [[1]], "y": [0]}}},
         "num_samples 3"),
    ],
)  # fmt: skip
def test_malformed_leaf_files_are_named(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        read_leaf(tmp_path)
    with pytest.raises(ConfigError, match="No LEAF"):
        read_leaf(tmp_path / "nowhere")


def test_test_users_without_training_data_are_refused(tmp_path):
    _write_leaf(tmp_path / "train", {"a": ([[0.0]], [0])})
    _write_leaf(tmp_path / "test", {"a": ([[0.0]], [0]), "b": ([[1.0]], [1])})
    with pytest.raises(ConfigError, match=r"users with no training data: \['b'\]"):
        ClientDatasets.from_leaf(tmp_path)


def _write_csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _hospital_rows():
    return [
        {"hospital": h, "age": 30 + i, "dose": 0.5 * i, "outcome": "ok" if i % 2 else "sick"}
        for h in ("north", "south", "east")
        for i in range(10)
    ]


def test_a_csv_table_with_a_client_column(tmp_path, trainer_factory):
    path = tmp_path / "patients.csv"
    _write_csv(path, _hospital_rows())
    dm = ClientDatasets.from_table(path, "hospital", "outcome", test_fraction=0.2, batch_size=4)
    dm.setup("fit")
    assert dm.client_names == ["east", "north", "south"]
    assert dm.label_names == ["ok", "sick"] and dm.num_classes == 2
    assert dm.num_train.tolist() == [8, 8, 8]
    x, y = dm.train_sets[1][0]
    assert x.shape == (2,) and int(y) in (0, 1)
    torch.manual_seed(0)
    fed = federation(MLPClassifier(input_size=2, hidden=(4,), num_classes=2), local_steps=1)
    trainer_factory(rounds=1, callbacks=[FedAvg()]).fit(fed, dm)
    assert fed.trainer.global_step == 3


def test_table_errors_name_the_column_or_row(tmp_path):
    path = tmp_path / "t.csv"
    rows = _hospital_rows()
    rows[4]["dose"] = "high"
    _write_csv(path, rows)
    with pytest.raises(ConfigError, match="no column 'site'"):
        ClientDatasets.from_table(path, "site", "outcome")
    with pytest.raises(ConfigError, match="feature 'dose' of row 4 is 'high'"):
        ClientDatasets.from_table(path, "hospital", "outcome")
    with pytest.raises(ConfigError, match="No table at"):
        ClientDatasets.from_table(tmp_path / "missing.csv", "hospital", "outcome")


def test_a_parquet_table_reads_like_the_csv(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = _hospital_rows()
    columns = {name: [r[name] for r in rows] for name in rows[0]}
    pq.write_table(pa.table(columns), tmp_path / "t.parquet")
    _write_csv(tmp_path / "t.csv", rows)
    a = ClientDatasets.from_table(tmp_path / "t.parquet", "hospital", "outcome", seed=1)
    b = ClientDatasets.from_table(tmp_path / "t.csv", "hospital", "outcome", seed=1)
    a.setup("fit"), b.setup("fit")
    assert a.client_names == b.client_names and a.label_names == b.label_names
    for k in range(3):
        torch.testing.assert_close(a.test_x[k], b.test_x[k])
        assert torch.equal(a.test_y[k], b.test_y[k])
