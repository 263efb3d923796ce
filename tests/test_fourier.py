"""The Fourier mixing math (pl_federated/fourier.py) against a NumPy reference."""

import numpy as np
import pytest
import torch

from pl_federated import fourier
from pl_federated.fourier import fourier_mix, from_matrix, progressive_ratio, to_matrix, window_mask


def numpy_reference(weights, client_w, ratio, variant, symmetric=False):
    """Straightforward per-client PFA of one weight, written from the spec with NumPy."""
    mats = []
    for w in weights:
        if w.ndim == 4:
            n_out, c_in, h, ww = w.shape
            w = np.transpose(w, (1, 2, 3, 0)).reshape(c_in * h, ww * n_out)
        mats.append(w)
    rows, cols = mats[0].shape
    mask = np.zeros((rows, cols), dtype=bool)
    ch, cw = rows // 2, cols // 2
    bh, bw = int(rows * ratio / 2), int(cols * ratio / 2)
    if symmetric:
        mask[max(ch - bh, 0) : ch + bh + 1, max(cw - bw, 0) : cw + bw + 1] = bh > 0 and bw > 0
    else:
        mask[ch - bh : ch + bh, cw - bw : cw + bw] = True
    spectra = [np.fft.fftshift(np.fft.fft2(m)) for m in mats]
    amps = [np.abs(f) for f in spectra]
    phases = [np.angle(f) for f in spectra]
    p = np.asarray(client_w, dtype=float) / np.sum(client_w)
    mean_amp = sum(pk * a for pk, a in zip(p, amps, strict=True))
    mean_phase = sum(pk * ph for pk, ph in zip(p, phases, strict=True))
    out = []
    for k, w in enumerate(weights):
        amp = np.where(mask, mean_amp, amps[k])
        phase = np.where(mask, mean_phase, phases[k]) if variant == "amplitude_phase" else phases[k]
        m = np.real(np.fft.ifft2(np.fft.ifftshift(amp * np.exp(1j * phase))))
        if w.ndim == 4:
            n_out, c_in, h, ww = w.shape
            m = np.transpose(m.reshape(c_in, h, ww, n_out), (3, 0, 1, 2))
        out.append(m)
    return np.stack(out)


@pytest.mark.parametrize("shape", [(6, 5), (7, 9), (4, 3, 3, 3), (5, 2, 3, 3)])
@pytest.mark.parametrize("variant", ["amplitude", "amplitude_phase"])
@pytest.mark.parametrize("window", ["reference", "symmetric"])
def test_matches_numpy_reference(shape, variant, window):
    g = torch.Generator().manual_seed(0)
    stacked = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    weights = torch.tensor([1.0, 2.0, 5.0])
    got = fourier_mix(stacked, weights, 0.7, variant, window)
    ref = numpy_reference(stacked.numpy(), weights.numpy(), 0.7, variant, window == "symmetric")
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5, rtol=0)


def test_zero_ratio_leaves_every_client_unchanged():
    stacked = torch.randn(4, 8, 2, 3, 3)
    out = fourier_mix(stacked, torch.ones(4), ratio=0.0)
    torch.testing.assert_close(out, stacked, atol=1e-5, rtol=0)


def test_identical_clients_stay_identical():
    w = torch.randn(6, 10)
    out = fourier_mix(w.expand(3, 6, 10).clone(), torch.ones(3), 0.95, "amplitude_phase")
    for k in range(3):
        torch.testing.assert_close(out[k], w, atol=1e-5, rtol=0)


def test_amplitude_variant_keeps_each_clients_phase():
    stacked = torch.randn(3, 8, 8, dtype=torch.float64)
    # symmetric window: the result is exactly the inverse of the modified spectrum
    out = fourier_mix(stacked, torch.ones(3), 0.5, "amplitude", "symmetric")
    phase = lambda m: torch.fft.fftshift(torch.fft.fft2(m)).angle()  # noqa: E731
    mask = window_mask(8, 8, 0.5, "symmetric")
    for k in range(3):
        before, after = phase(stacked[k]), phase(out[k])
        diff = torch.remainder(after - before + torch.pi, 2 * torch.pi) - torch.pi
        assert diff[mask].abs().max() < 1e-6
    amp = lambda m: torch.fft.fftshift(torch.fft.fft2(m)).abs()  # noqa: E731
    assert torch.allclose(amp(out[0])[mask], amp(out[1])[mask], atol=1e-8)  # shared amplitude


@pytest.mark.parametrize(
    ("size", "ratio", "span"),
    [(8, 0.5, (2, 6)), (7, 0.5, (2, 4)), (9, 0.7, (1, 7)), (10, 0.95, (1, 9))],
)
def test_reference_mask_span_for_odd_and_even_sizes(size, ratio, span):
    mask = window_mask(size, size, ratio)
    rows = torch.nonzero(mask.any(1)).flatten()
    b = int(size * ratio / 2)
    assert (rows.min().item(), rows.max().item() + 1) == span == (size // 2 - b, size // 2 + b)


def test_symmetric_mask_is_point_symmetric_about_zero_frequency():
    for size in (7, 8):
        mask = window_mask(size, size, 0.6, "symmetric")
        c = size // 2
        for i in range(size):
            j = (2 * c - i) % size
            assert mask[i, c] == mask[j, c]


def test_matrix_views_and_schedule():
    w = torch.randn(2, 4, 3, 5, 5)
    m = to_matrix(w)
    assert m.shape == (2, 3 * 5, 5 * 4)
    assert torch.equal(from_matrix(m, w.shape), w)
    assert progressive_ratio(0, 10, 0.7, 0.95) == pytest.approx(0.7)
    assert progressive_ratio(5, 10, 0.7, 0.95) == pytest.approx(0.825)
    with pytest.raises(ValueError, match="window"):
        window_mask(4, 4, 0.5, "round")


def numpy_rows_reference(weights, client_w, ratio, variant):
    """Class-wise PFA written from the spec: a 1-D FFT per class row, reference window."""
    k, c, d = weights.shape
    mask = np.zeros(d, dtype=bool)
    centre, b = d // 2, int(d * ratio / 2)
    mask[centre - b : centre + b] = True
    spectra = np.fft.fftshift(np.fft.fft(weights, axis=-1), axes=-1)
    amps, phases = np.abs(spectra), np.angle(spectra)
    p = (np.asarray(client_w, dtype=float) / np.sum(client_w)).reshape(-1, 1, 1)
    amp = np.where(mask, (p * amps).sum(0, keepdims=True), amps)
    phase = np.where(mask, (p * phases).sum(0, keepdims=True), phases)
    phase = phase if variant == "amplitude_phase" else phases
    return np.real(np.fft.ifft(np.fft.ifftshift(amp * np.exp(1j * phase), axes=-1), axis=-1))


@pytest.mark.parametrize("variant", ["amplitude", "amplitude_phase"])
def test_classwise_rows_match_numpy_reference_and_never_mix(variant):
    from pl_federated.fourier import fourier_mix_rows

    torch.manual_seed(0)
    stacked = torch.randn(3, 4, 9, dtype=torch.float64)
    weights = torch.tensor([1.0, 2.0, 3.0])
    out = fourier_mix_rows(stacked, weights, 0.6, variant)
    ref = numpy_rows_reference(stacked.numpy(), weights.numpy(), 0.6, variant)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-10)
    torch.testing.assert_close(fourier_mix_rows(stacked, weights, 0.0, variant), stacked)  # r=0
    other = stacked.clone()
    other[:, 2] += 5.0  # change class 2 of every client: the other classes' rows are unchanged
    moved = fourier_mix_rows(other, weights, 0.6, variant)
    keep = [0, 1, 3]
    torch.testing.assert_close(moved[:, keep], out[:, keep])


@pytest.mark.parametrize("variant", ["amplitude", "amplitude_phase"])
def test_fourier_mix_in_client_chunks_equals_one_chunk(variant, monkeypatch):
    """Chunking over clients (bounded FFT memory) gives the same weights as one chunk."""
    gen = torch.Generator().manual_seed(0)
    conv = torch.randn(7, 6, 3, 5, 5, generator=gen)
    rows = torch.randn(7, 10, 12, generator=gen)
    weights = torch.rand(7, generator=gen) + 0.1
    whole = (
        fourier.fourier_mix(conv, weights, 0.6, variant),
        fourier.fourier_mix_rows(rows, weights, 0.6, variant),
    )
    monkeypatch.setattr(fourier, "CHUNK_ELEMENTS", 2 * 6 * 3 * 25)  # chunks of 2 clients
    chunked = (
        fourier.fourier_mix(conv, weights, 0.6, variant),
        fourier.fourier_mix_rows(rows, weights, 0.6, variant),
    )
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk", [None, 2 * 10 * 12])
def test_fourier_mix_inplace_writes_the_same_result_into_the_input(chunk, monkeypatch):
    """``inplace`` (PFA's memory saver) overwrites the stacked input with exactly the result
    of the out-of-place call, with one chunk and with chunks of 2 clients."""
    if chunk is not None:
        monkeypatch.setattr(fourier, "CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(1)
    linear = torch.randn(5, 10, 12, generator=gen)
    conv = torch.randn(5, 4, 3, 3, 3, generator=gen)
    weights = torch.rand(5, generator=gen) + 0.1
    for stacked, mix in (
        (linear, fourier.fourier_mix),
        (conv, fourier.fourier_mix),
        (linear, fourier.fourier_mix_rows),
    ):
        expected = mix(stacked, weights, 0.6, "amplitude_phase")
        target = stacked.clone()
        result = mix(target, weights, 0.6, "amplitude_phase", inplace=True)
        assert result.data_ptr() == target.data_ptr()
        torch.testing.assert_close(target, expected, atol=0, rtol=0)
