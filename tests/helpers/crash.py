"""A callback that kills its own process (SIGKILL) at a chosen moment, for the crash tests.

--trainer.callbacks+='{"class_path": "helpers.crash.KillAt",
                      "init_args": {"round": 2, "moment": "mid_round"}}'
"""

from __future__ import annotations

import io
import os
import signal

import torch

from pl_federated.callbacks import FederatedCallback

MOMENTS = ("mid_round", "checkpoint_write")


class KillAt(FederatedCallback):
    """SIGKILL in round ``round``: ``mid_round`` right after the first client's update,
    ``checkpoint_write`` halfway through writing that round's checkpoint (half of its bytes
    are on disk)."""

    def __init__(self, round: int, moment: str = "mid_round") -> None:
        if moment not in MOMENTS:
            raise ValueError(f"`moment` must be one of {MOMENTS}, got {moment!r}.")
        self.round, self.moment = round, moment

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.moment != "checkpoint_write":
            return
        real_save = torch.save

        def dies_while_writing(obj, f, *args, **kwargs):
            if trainer.current_epoch != self.round or isinstance(f, io.BytesIO):
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = dies_while_writing

    def on_client_end(self, trainer, fed, client) -> None:
        if self.moment == "mid_round" and fed.current_round == self.round:
            os.kill(os.getpid(), signal.SIGKILL)
