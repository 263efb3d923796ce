import pytest
import torch
from helpers import digits, federation
from lightning.pytorch.plugins import MixedPrecision

from pl_federated.models import MLPClassifier


class DtypeRecorder(MLPClassifier):
    """Records the dtype of the logits it computes in training and evaluation."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.train_dtype = out["logits"].dtype
        return out

    def forward(self, x):
        logits = super().forward(x)
        if not self.training:
            self.eval_dtype = logits.dtype
        return logits


def fit(trainer_factory, **trainer_kwargs):
    torch.manual_seed(0)
    fed = federation(client=DtypeRecorder(lr=0.05, momentum=0.9), local_epochs=2)
    trainer = trainer_factory(rounds=4, **trainer_kwargs)
    trainer.fit(fed, digits(num_clients=4))
    return fed, trainer


def test_bf16_mixed_autocasts_clients_and_keeps_fp32_state(trainer_factory):
    fed, trainer = fit(trainer_factory, precision="bf16-mixed")
    assert fed.shared_worker.train_dtype == torch.bfloat16
    assert fed.shared_worker.eval_dtype == torch.bfloat16  # evaluation runs under the same autocast
    assert all(v.dtype == torch.float32 for k, v in fed.server_state.items() if "weight" in k)
    # bf16 CPU kernels are not bitwise deterministic across processes: compare loosely.
    _, full = fit(trainer_factory, precision="32-true")
    bf16_acc = trainer.callback_metrics["global/acc"].item()
    assert bf16_acc == pytest.approx(full.callback_metrics["global/acc"].item(), abs=0.05)


def test_fp16_grad_scaler_path_on_cpu(trainer_factory):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    fed, trainer = fit(trainer_factory, plugins=[plugin])
    assert fed.shared_worker.train_dtype == torch.float16
    # the shared scaler was used (scale initialised) and gradients were unscaled before each
    # step: with a 1024x loss scale an unscaled SGD step would diverge.
    assert scaler._scale is not None and scaler.get_scale() > 0
    assert fed.history[-1]["round/excluded_clients"] == 0
    _, full = fit(trainer_factory, precision="32-true")
    fp16_acc = trainer.callback_metrics["global/acc"].item()
    assert fp16_acc == pytest.approx(full.callback_metrics["global/acc"].item(), abs=0.05)


def test_full_precision_baseline(trainer_factory):
    fed, trainer = fit(trainer_factory, precision="32-true")
    assert fed.shared_worker.train_dtype == torch.float32
    assert trainer.callback_metrics["global/acc"].item() == pytest.approx(
        fed.history[-1]["global/acc"]
    )
