"""Fourier-domain mixing of client weights (Progressive Fourier Aggregation), batched.

Pure functions over stacked client tensors ``[K, ...]``: one FFT call per weight tensor for all
clients, no Python loop over clients. Spec (Chen et al., PRR-FL; our words in DESIGN.md):
a conv weight ``(N_out, C_in, h, w)`` is viewed as the matrix ``permute(1, 2, 3, 0)`` reshaped
to ``(C_in*h, w*N_out)``; a linear weight is used as is. ``F = fftshift(fft2(W))``; inside a
centred low-frequency window the amplitude (and optionally the phase) is replaced by the
clients' mean, outside it each client keeps its own; ``W' = real(ifft2(ifftshift(F')))``.
"""

from __future__ import annotations

import torch
from torch import Tensor

VARIANTS = ("amplitude", "amplitude_phase")
WINDOWS = ("reference", "symmetric")


def to_matrix(stacked: Tensor) -> Tensor:
    """``[K, N_out, C_in, h, w] -> [K, C_in*h, w*N_out]``; ``[K, out, in]`` unchanged."""
    if stacked.ndim == 3:
        return stacked
    if stacked.ndim == 5:
        k, n_out, c_in, h, w = stacked.shape
        return stacked.permute(0, 2, 3, 4, 1).reshape(k, c_in * h, w * n_out)
    raise ValueError(f"Expected a stacked linear (3-D) or conv (5-D) weight, got {stacked.ndim}-D.")


def from_matrix(matrix: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`to_matrix` for stacked weights of ``shape``."""
    if len(shape) == 3:
        return matrix
    k, n_out, c_in, h, w = shape
    return matrix.reshape(k, c_in, h, w, n_out).permute(0, 4, 1, 2, 3).contiguous()


def window_mask(rows: int, cols: int, ratio: float, window: str = "reference") -> Tensor:
    """Boolean ``[rows, cols]`` mask of the centred low-frequency window (after fftshift).

    ``b = floor(size * ratio / 2)`` per axis around the centre ``c = size // 2``:
    ``reference`` covers indices ``[c - b, c + b)`` (the reference code; its modified spectrum
    is not Hermitian, so ``real(ifft2)`` drops an imaginary part); ``symmetric`` covers the
    frequencies ``-b..b``, i.e. indices ``[c - b, c + b]`` clipped to the array, whose inverse
    transform is real.
    """
    if window not in WINDOWS:
        raise ValueError(f"`window` must be one of {WINDOWS}, got {window!r}.")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"`ratio` must be in [0, 1], got {ratio!r}.")
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    (r0, r1), (c0, c1) = (_span(size, ratio, window) for size in (rows, cols))
    mask[r0:r1, c0:c1] = True
    return mask


def _span(size: int, ratio: float, window: str) -> tuple[int, int]:
    """The half-open index range of the centred window along one axis of ``size``."""
    c, b = size // 2, int(size * ratio / 2)
    if window == "reference":
        return c - b, c + b
    return (max(c - b, 0), min(c + b + 1, size)) if b > 0 else (c, c)


CHUNK_ELEMENTS = 2**22
"""Clients per FFT chunk are chosen so a chunk holds about this many weights: the complex128
temporaries of one chunk then take about 0.3 GiB, whatever the number of clients."""


def _mix_spectra(
    matrix: Tensor,
    mask: Tensor,
    weights: Tensor,
    variant: str,
    dims: tuple[int, ...],
    out: Tensor | None = None,
) -> Tensor:
    """Inside ``mask``, replace the amplitude (and for ``amplitude_phase`` the phase) of each
    client's shifted FFT over ``dims`` of ``matrix`` ``[K, ...]`` by the ``weights``-weighted
    mean over clients, and transform back (in float64, chunk by chunk; the result has
    ``matrix``'s dtype) into ``out`` (a new tensor by default; ``out=matrix`` is safe: a chunk
    is read before it is overwritten).

    Clients are processed in chunks (:data:`CHUNK_ELEMENTS`): one pass sums the weighted
    amplitudes (and phases), a second recomputes each chunk's spectrum and mixes it. One chunk
    (the common case) computes each spectrum once.
    """
    fft = torch.fft.fft2 if len(dims) == 2 else torch.fft.fft
    ifft = torch.fft.ifft2 if len(dims) == 2 else torch.fft.ifft

    def spectrum(rows: Tensor) -> Tensor:
        return torch.fft.fftshift(fft(rows) if len(dims) == 2 else fft(rows, dim=-1), dim=dims)

    k = matrix.shape[0]
    per = max(1, CHUNK_ELEMENTS // max(1, matrix[0].numel()))
    chunks = [slice(start, min(start + per, k)) for start in range(0, k, per)]
    w = weights.to(torch.float64) / weights.to(torch.float64).sum()
    mean_amp = mean_phase = None
    cached: Tensor | None = None
    for part in chunks:
        spec = spectrum(matrix[part].to(torch.float64))
        wv = w[part].to(spec.real).view(-1, *[1] * (spec.ndim - 1))
        amp = (wv * spec.abs()).sum(0, keepdim=True)
        mean_amp = amp if mean_amp is None else mean_amp + amp
        if variant == "amplitude_phase":
            phase = (wv * spec.angle()).sum(0, keepdim=True)
            mean_phase = phase if mean_phase is None else mean_phase + phase
        cached = spec if len(chunks) == 1 else None
    out = torch.empty_like(matrix) if out is None else out
    for part in chunks:
        spec = cached if cached is not None else spectrum(matrix[part].to(torch.float64))
        amp = torch.where(mask, mean_amp, spec.abs())
        phase = spec.angle()
        if variant == "amplitude_phase":
            phase = torch.where(mask, mean_phase, phase)
        mixed = torch.fft.ifftshift(torch.polar(amp, phase), dim=dims)
        out[part] = (ifft(mixed) if len(dims) == 2 else ifft(mixed, dim=-1)).real
    return out


def fourier_mix_rows(
    stacked: Tensor,
    weights: Tensor,
    ratio: float,
    variant: str = "amplitude",
    window: str = "reference",
    inplace: bool = False,
) -> Tensor:
    """Class-wise PFA for a classifier weight ``[K, classes, features]``: each class row gets a
    1-D FFT over its features, and the low-frequency window (``ratio`` of the feature axis,
    same windows as :func:`window_mask`) of its amplitude (and phase) is replaced by the
    clients' weighted mean of that same row. Rows never mix. ``inplace`` writes the result
    into ``stacked``."""
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}.")
    if window not in WINDOWS:
        raise ValueError(f"`window` must be one of {WINDOWS}, got {window!r}.")
    if stacked.ndim != 3:
        raise ValueError(
            f"Class-wise PFA needs [K, classes, features], got {tuple(stacked.shape)}."
        )
    matrix = stacked
    size = matrix.shape[-1]
    lo, hi = _span(size, ratio, window)
    mask = torch.zeros(size, dtype=torch.bool, device=matrix.device)
    mask[lo:hi] = True
    return _mix_spectra(matrix, mask, weights, variant, (-1,), out=matrix if inplace else None)


def fourier_mix(
    stacked: Tensor,
    weights: Tensor,
    ratio: float,
    variant: str = "amplitude",
    window: str = "reference",
    inplace: bool = False,
) -> Tensor:
    """One personalized weight per client: the low frequencies of the amplitude (and phase)
    spectrum are replaced by their ``weights``-weighted mean over clients.

    Args:
        stacked: ``[K, out, in]`` or ``[K, N_out, C_in, h, w]`` client weights.
        weights: ``[K]`` non-negative client weights (normalized here).
        ratio: window size as a fraction of each matrix dimension.
        variant: ``"amplitude"`` (phase kept per client) or ``"amplitude_phase"``.
        window: ``"reference"`` or ``"symmetric"`` (see :func:`window_mask`).
        inplace: write the result into ``stacked`` (which it returns): no second tensor of
            its size, which matters for large layers of many clients (a conv weight still
            goes through one permuted copy).
    """
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}.")
    matrix = to_matrix(stacked)
    rows, cols = matrix.shape[-2:]
    mask = window_mask(rows, cols, ratio, window).to(matrix.device)
    into = matrix if inplace else None
    out = from_matrix(
        _mix_spectra(matrix, mask, weights, variant, (-2, -1), out=into), stacked.shape
    )
    if inplace and out.data_ptr() != stacked.data_ptr():
        stacked.copy_(out)
        return stacked
    return out


def progressive_ratio(round: int, rounds: int, r0: float, r1: float) -> float:
    """``r_t = r0 + (t / T) (r1 - r0)``: the window grows linearly over the run."""
    return r0 + (round / max(rounds, 1)) * (r1 - r0)
