"""Frame metrics of videos (numpy; frames in [0, 1]).

- `psnr`: 10 log10(1 / MSE) per frame, capped (identical frames give the cap, not inf). This is
  the project's one PSNR: a per-clip PSNR is `psnr` of the clip reshaped to one tall frame.
- `ssim`: Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5; shrunk to the frame when
  the frame is smaller), C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = 1, over the 'valid' window
  positions (as the reference MATLAB ssim.m), averaged over positions and channels.
"""

from __future__ import annotations

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, *, cap: float = 100.0) -> np.ndarray:
  """PSNR in dB of frames [..., H, W, C] in [0, 1]; returns [...], at most `cap`."""
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2, axis=(-3, -2, -1))
  with np.errstate(divide="ignore"):
    out = 10.0 * np.log10(1.0 / mse)
  return np.minimum(out, cap)


def _gaussian_matrix(n: int, win: int, sigma: float) -> np.ndarray:
  """[n - win + 1, n] matrix applying a normalised 1-D Gaussian window at each valid position."""
  x = np.arange(win, dtype=np.float64) - (win - 1) / 2.0
  w = np.exp(-0.5 * (x / sigma) ** 2)
  w /= w.sum()
  m = np.zeros((n - win + 1, n))
  for i in range(n - win + 1):
    m[i, i:i + win] = w
  return m


def ssim(a: np.ndarray, b: np.ndarray, *, win: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03, data_range: float = 1.0) -> np.ndarray:
  """Mean SSIM of frames [..., H, W, C] in [0, data_range]; returns [...]."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  h, w = a.shape[-3:-1]
  win = min(win, h, w)
  win -= 1 - win % 2  # odd
  gh, gw = _gaussian_matrix(h, win, sigma), _gaussian_matrix(w, win, sigma)
  filt = lambda x: np.einsum("ih,...hwc,jw->...ijc", gh, x, gw, optimize=True)
  mu_a, mu_b = filt(a), filt(b)
  var_a = filt(a * a) - mu_a ** 2
  var_b = filt(b * b) - mu_b ** 2
  cov = filt(a * b) - mu_a * mu_b
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
       / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
  return s.mean(axis=(-3, -2, -1))


def clip_psnr(a: np.ndarray, b: np.ndarray, *, cap: float = 100.0) -> np.ndarray:
  """PSNR in dB of whole clips [B, T, H, W, C] in [0, 1] (MSE over every frame); returns [B]."""
  a, b = np.asarray(a), np.asarray(b)
  return psnr(a.reshape(a.shape[0], -1, *a.shape[-2:]), b.reshape(b.shape[0], -1, *b.shape[-2:]),
              cap=cap)
