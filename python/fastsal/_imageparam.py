"""Lucid's image parameterisation for class visualisation, as NumPy maps with their adjoints: a 1/f-scaled
Fourier spectrum, decorrelated colour, a sigmoid onto [0, 1] pixels and random affine transformations.
Each ``forward`` has an ``adjoint`` (or ``backward``) so the engine's input gradient flows back to the
spectrum by the chain rule; the engine itself is untouched."""

from __future__ import annotations

import numpy as np

# Lucid's square root of ImageNet's RGB colour covariance (its eigenvectors scaled by the square roots of
# their eigenvalues), lucid/optvis/param/color.py, also lucent/optvis/param/color.py: rows R, G, B.
COLOR_CORRELATION_SVD_SQRT = np.array(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], np.float64
)
# Normalised as Lucid does: its largest column norm becomes 1.
COLOR_CORRELATION = COLOR_CORRELATION_SVD_SQRT / np.linalg.norm(COLOR_CORRELATION_SVD_SQRT, axis=0).max()


class Spectrum:
    """Lucid's ``fft_image``: an (H, W) image per channel as ``irfft2(scale * spectrum) / 4``, the
    orthonormal inverse real FFT of a spectrum scaled by 1 / max(|f|, 1 / max(H, W)) (``decay_power`` 1),
    so every frequency's step moves the image by the same amount relative to natural images' 1/f
    amplitudes. The spectrum's real and imaginary parts are the parameters, (..., H, W // 2 + 1, 2)."""

    MAGIC = 4.0  # Lucid's constant that keeps the first images from saturating

    def __init__(self, height: int, width: int, decay_power: float = 1.0):
        self.shape = (height, width)
        fy = np.fft.fftfreq(height)[:, None]
        fx = np.fft.rfftfreq(width)[None, :]
        frequency = np.sqrt(fx * fx + fy * fy)
        self.scale = (1.0 / np.maximum(frequency, 1.0 / max(height, width)) ** decay_power) / self.MAGIC
        # irfft2 reads the columns of frequency 0 (and W / 2 for even W) once, every other column twice
        # (itself and its unstored conjugate): the adjoint counts them the same way.
        self.multiplicity = np.full(fx.shape[1], 2.0)
        self.multiplicity[0] = 1.0
        if width % 2 == 0:
            self.multiplicity[-1] = 1.0

    def parameter_shape(self, leading: tuple[int, ...]) -> tuple[int, ...]:
        return (*leading, *self.scale.shape, 2)

    def forward(self, spectrum: np.ndarray) -> np.ndarray:
        complex_spectrum = self.scale * (spectrum[..., 0] + 1j * spectrum[..., 1])
        return np.fft.irfft2(complex_spectrum, s=self.shape, norm="ortho")

    def adjoint(self, gradient: np.ndarray) -> np.ndarray:
        """The gradient wrt the spectrum's (real, imaginary) parts of <image, gradient>."""
        g = np.fft.rfft2(gradient, norm="ortho") * (self.multiplicity * self.scale)
        return np.stack([g.real, g.imag], axis=-1)


def decorrelate(image: np.ndarray) -> np.ndarray:
    """(..., 3, H, W) decorrelated channels to RGB by Lucid's colour matrix (``_linear_decorrelate_color``)."""
    return np.einsum("ij,...jhw->...ihw", COLOR_CORRELATION, image)


def decorrelate_adjoint(gradient: np.ndarray) -> np.ndarray:
    return np.einsum("ij,...ihw->...jhw", COLOR_CORRELATION, gradient)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def random_affine(rng: np.random.Generator, height: int, width: int, *, translate: float, scales, angles):
    """Lucid's ``standard_transforms`` for a fixed input size, as one (HW, HW) bilinear resampling matrix:
    a random scale, rotation (degrees) and whole-pixel shift of up to ``translate`` times the larger side,
    about the centre; pixels sampled from outside the image are grey (Lucid pads with 0.5), so the map
    applies to ``image - 0.5``."""
    from scipy import sparse

    scale = float(rng.choice(scales))
    angle = np.deg2rad(float(rng.choice(angles)))
    shift = round(translate * max(height, width))
    dy, dx = rng.integers(-shift, shift + 1, 2) if shift else (0, 0)
    cy, cx = (height - 1) / 2, (width - 1) / 2
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    # Output pixel (y, x) reads the source at the inverse transformation of its position.
    ry, rx = y - cy - dy, x - cx - dx
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    sy, sx = cos * ry - sin * rx + cy, sin * ry + cos * rx + cx
    y0, x0 = np.floor(sy).astype(np.int64), np.floor(sx).astype(np.int64)
    fy, fx = sy - y0, sx - x0
    rows, cols, weights = [], [], []
    out = np.arange(height * width).reshape(height, width)
    for oy, ox, w in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        yy, xx = y0 + oy, x0 + ox
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width) & (w > 0)
        rows.append(out[inside])
        cols.append(yy[inside] * width + xx[inside])
        weights.append(w[inside])
    size = height * width
    return sparse.csr_matrix(
        (np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))), shape=(size, size)
    )


def apply_affine(matrix, image: np.ndarray, transpose: bool = False) -> np.ndarray:
    """A (C, H, W) image through a resampling matrix (or its transpose, the adjoint)."""
    c, h, w = image.shape
    m = matrix.T if transpose else matrix
    return np.asarray(m @ image.reshape(c, h * w).T).T.reshape(c, h, w)


class Adam:
    """Adam (Kingma & Ba 2015) ascending, as Lucid's ``render_vis`` runs it (learning rate 0.05)."""

    def __init__(self, shape, learning_rate: float, beta1=0.9, beta2=0.999, eps=1e-8):
        self.m, self.v = np.zeros(shape), np.zeros(shape)
        self.learning_rate, self.beta1, self.beta2, self.eps, self.t = learning_rate, beta1, beta2, eps, 0

    def step(self, parameters: np.ndarray, gradient: np.ndarray) -> None:
        self.t += 1
        self.m = self.beta1 * self.m + (1 - self.beta1) * gradient
        self.v = self.beta2 * self.v + (1 - self.beta2) * gradient * gradient
        m_hat = self.m / (1 - self.beta1**self.t)
        v_hat = self.v / (1 - self.beta2**self.t)
        parameters += self.learning_rate * m_hat / (np.sqrt(v_hat) + self.eps)
