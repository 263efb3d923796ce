"""Class prototypes (per-class mean features) per client and their server-side average: the
one implementation shared by CPA (PRR-FL) and FedProto."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

_WEIGHTINGS = ("clients", "samples")


class PrototypeBank:
    """Local prototypes of every client (``local [K, C, D]``, with ``counts [K, C]`` of the
    samples behind them) and the global prototypes (``global_ [C, D]``, ``global_present
    [C]``).

    During a client's update, :meth:`accumulate` sums features per class; :meth:`finish_client`
    turns the sums into that client's prototypes (the client's upload). :meth:`aggregate`
    averages the uploads per class over the clients holding that class, either uniformly
    (``"clients"``, the CPA reference) or weighted by their sample counts (``"samples"``,
    FedProto's ``|D_i,c| / N_c``). A class no client holds stays absent, never NaN.
    """

    def __init__(self, num_clients: int, num_classes: int) -> None:
        self.num_clients, self.num_classes = num_clients, num_classes
        self.local: Tensor | None = None
        self.counts = torch.zeros(num_clients, num_classes)
        self.global_: Tensor | None = None
        self.global_present = torch.zeros(num_classes, dtype=torch.bool)
        self._sums: Tensor | None = None
        self._n = torch.zeros(num_classes)

    def start_client(self) -> None:
        """Clear the running sums (a client's update begins)."""
        self._sums, self._n = None, torch.zeros(self.num_classes)

    @torch.no_grad()
    def accumulate(self, features: Tensor, targets: Tensor) -> None:
        """Add a batch of features ``[B, ...]`` (flattened) with their labels to the sums."""
        features = features.detach().flatten(1).float().cpu()
        targets = targets.cpu()
        if self._sums is None:
            self._sums = torch.zeros(self.num_classes, features.shape[1])
        self._sums.index_add_(0, targets, features)
        self._n += torch.bincount(targets, minlength=self.num_classes).float()

    def finish_client(self, client: int) -> bool:
        """Store ``client``'s prototypes (sums / counts) and counts; no-op without samples.
        Returns whether something was stored."""
        if self._sums is None:
            return False
        self.put(client, self._sums / self._n.clamp_min(1).unsqueeze(1), self._n)
        return True

    def put(self, client: int, prototypes: Tensor, counts: Tensor) -> None:
        """Set ``client``'s prototypes ``[C, D]`` and per-class sample counts ``[C]`` (e.g.
        another process's client under ``fed_ddp``)."""
        if self.local is None:
            self.local = torch.zeros(self.num_clients, *prototypes.shape)
        self.local[client] = prototypes
        self.counts[client] = counts

    @property
    def local_present(self) -> Tensor:
        """``[K, C]`` bool: which client holds a prototype of which class."""
        return self.counts > 0

    def aggregate(
        self,
        weighting: str = "clients",
        clients: Sequence[int] | None = None,
        noise_std: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        """Average the local prototypes of ``clients`` (default: all) per class into
        ``global_``; classes none of them holds keep their previous global prototype. Optional
        Gaussian noise of std ``noise_std`` (CPA reference)."""
        if weighting not in _WEIGHTINGS:
            raise ValueError(f"`weighting` must be one of {_WEIGHTINGS}, got {weighting!r}.")
        if self.local is None:
            return
        rows = slice(None) if clients is None else torch.as_tensor(list(clients))
        counts = self.counts[rows]
        weight = (counts > 0).float() if weighting == "clients" else counts
        total = weight.sum(0)  # [C]
        present = total > 0
        new = (self.local[rows] * weight.unsqueeze(-1)).sum(0) / total.clamp_min(1e-12).unsqueeze(
            -1
        )
        if noise_std > 0:
            new = new + torch.randn(new.shape, generator=generator) * noise_std
        if self.global_ is None:
            self.global_ = torch.zeros_like(new)
        self.global_[present] = new[present]
        self.global_present = self.global_present | present

    def state_dict(self) -> dict[str, Any]:
        return {
            "local": self.local,
            "counts": self.counts,
            "global_": self.global_,
            "global_present": self.global_present,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("local", "counts", "global_", "global_present"):
            setattr(self, key, state[key])

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrototypeBank:
        """A bank rebuilt from :meth:`state_dict` (checkpoint restore)."""
        bank = cls(*state["counts"].shape)
        bank.load_state_dict(state)
        return bank
