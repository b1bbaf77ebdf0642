"""Quality metrics: class accuracy and Fréchet distance for digits, PSNR and SSIM for fidelity.

- `DigitClassifier`: an MLP (sklearn, fixed seed, ~2 s to fit) trained on all 1797 real digits
  after the same 16x16 round trip the model's training data went through, evaluated on the
  8x8 average-pooled image. Its hidden layer (64 ReLU units) is the feature space of the
  Fréchet distance — the role Inception-v3's pool features play in FID.
- `frechet_distance`: ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2})  (Heusel et al. 2017,
  written with the symmetric square root so it needs only `eigvalsh`).
- `psnr`, `ssim`: per-image fidelity of a pruned model's image against the dense model's
  image of the same seed and initial noise (uint8, data range 255). SSIM follows Wang et al.
  2004 with a 7x7 uniform window (scikit-image's default), valid region only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

FEATURE_DIM = 64


def _to_unit_float(images: np.ndarray) -> np.ndarray:
    """uint8 N×H×W(×1) -> float N×H×W in [0, 1]."""
    images = np.asarray(images)
    if images.ndim == 4:
        if images.shape[-1] != 1:
            raise ValueError(
                f"digit metrics read one-channel images (digits-dit's samples), got shape {images.shape}: "
                "for another model's images use --metric fid,is (or clip)"
            )
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(f"expected images N×H×W(×1), got shape {images.shape}")
    return images.astype(np.float64) / 255.0


def _pool_to_8x8(images: np.ndarray) -> np.ndarray:
    """N×H×W in [0,1] -> N×64 by average pooling to 8x8 (H, W multiples of 8)."""
    n, h, w = images.shape
    if h % 8 or w % 8:
        raise ValueError(
            f"digit images must be a multiple of 8 pixels wide (digits-dit's are 16x16), got {h}x{w}: "
            "for another model's images use --metric fid,is (or clip)"
        )
    pooled = images.reshape(n, 8, h // 8, 8, w // 8).mean(axis=(2, 4))  # N×8×8
    return pooled.reshape(n, 64)


@lru_cache(maxsize=1)
def real_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 real digits as uint8 N×16×16×1 images (the model's data), and their labels."""
    from mosaic_core.models.digits import load_digit_images

    x, y = load_digit_images()
    images = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return images, y.numpy()


@dataclass
class DigitClassifier:
    """A fitted digit classifier whose hidden layer gives Fréchet-distance features."""

    model: object  # sklearn MLPClassifier

    @classmethod
    def fit(cls, seed: int = 0) -> "DigitClassifier":
        """Fit on all real digits (deterministic for a seed)."""
        from sklearn.neural_network import MLPClassifier

        images, labels = real_digit_images()
        mlp = MLPClassifier(hidden_layer_sizes=(FEATURE_DIM,), alpha=1e-3, max_iter=600, random_state=seed)
        mlp.fit(_pool_to_8x8(_to_unit_float(images)), labels)
        return cls(mlp)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Predicted class per image (uint8 N×H×W×1)."""
        return self.model.predict(_pool_to_8x8(_to_unit_float(images)))

    def features(self, images: np.ndarray) -> np.ndarray:
        """Hidden-layer activations (N×64): ReLU(x W₁ + b₁)."""
        x = _pool_to_8x8(_to_unit_float(images))
        return np.maximum(x @ self.model.coefs_[0] + self.model.intercepts_[0], 0.0)


@lru_cache(maxsize=1)
def digit_classifier() -> DigitClassifier:
    """The project's shared, fitted classifier (fitted once per process)."""
    return DigitClassifier.fit()


def class_accuracy(images: np.ndarray, labels: np.ndarray, classifier: DigitClassifier | None = None) -> float:
    """Fraction of images the classifier assigns to their conditioning label."""
    classifier = classifier or digit_classifier()
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return float(np.mean(classifier.predict(images) == labels))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples)."""
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two N×D feature sets with N >= 2 and equal D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((Σa Σb)^{1/2}) = Σ sqrt(eig(Σa^{1/2} Σb Σa^{1/2})), a symmetric PSD matrix.
    vals, vecs = np.linalg.eigh(cov_a)
    sqrt_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)


@lru_cache(maxsize=1)
def _real_features() -> np.ndarray:
    return digit_classifier().features(real_digit_images()[0])


def digit_fd(images: np.ndarray) -> float:
    """Fréchet distance of generated digits to all 1797 real digits, in classifier features."""
    return frechet_distance(digit_classifier().features(images), _real_features())


def psnr(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB (uint8, peak 255); identical images give +inf."""
    a, b = np.asarray(images, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"PSNR needs images of equal shape, got {a.shape} and {b.shape}")
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0**2 / mse)


def mean_psnr(images: np.ndarray, reference: np.ndarray, cap: float = 100.0) -> float:
    """Mean PSNR over images, each capped at `cap` dB so identical pairs stay finite."""
    return float(np.minimum(psnr(images, reference), cap).mean())


def ssim(images: np.ndarray, reference: np.ndarray, window: int = 7) -> np.ndarray:
    """Per-image mean SSIM (uint8 N×H×W×C), 7x7 uniform window, averaged over channels."""
    a, b = np.asarray(images, np.float64), np.asarray(reference, np.float64)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"SSIM needs two N×H×W×C arrays of equal shape, got {a.shape} and {b.shape}")
    if min(a.shape[1:3]) < window:
        raise ValueError(f"images must be at least {window} pixels wide for SSIM")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    from numpy.lib.stride_tricks import sliding_window_view

    def local_mean(x):  # N×H×W×C -> N×(H-w+1)×(W-w+1)×C
        return sliding_window_view(x, (window, window), axis=(1, 2)).mean(axis=(-1, -2))

    n_pixels = window * window
    correction = n_pixels / (n_pixels - 1)  # sample covariance, as scikit-image
    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = (local_mean(a * a) - mu_a**2) * correction
    var_b = (local_mean(b * b) - mu_b**2) * correction
    cov = (local_mean(a * b) - mu_a * mu_b) * correction
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.reshape(len(a), -1).mean(1)
