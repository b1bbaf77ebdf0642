"""Quality metrics: classifier, Fréchet distance, PSNR, SSIM."""

import numpy as np
import pytest

from mosaic_core.conquer.metrics import class_accuracy, digit_classifier, digit_fd, frechet_distance, mean_psnr, psnr, real_digit_images, ssim


def test_classifier_recognises_real_digits_and_not_noise():
    images, labels = real_digit_images()
    assert images.shape == (1797, 16, 16, 1) and images.dtype == np.uint8
    assert class_accuracy(images, labels) > 0.98
    noise = np.random.default_rng(0).integers(0, 256, images[:300].shape, dtype=np.uint8)
    assert class_accuracy(noise, labels[:300]) < 0.3


def test_fit_is_deterministic():
    from mosaic_core.conquer.metrics import DigitClassifier

    images = real_digit_images()[0][:50]
    np.testing.assert_array_equal(DigitClassifier.fit().features(images), digit_classifier().features(images))


def test_frechet_distance_properties():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # two Gaussians with identity covariance, means 3 apart along one axis: FD = 9
    b = rng.normal(size=(50000, 4))
    c = rng.normal(size=(50000, 4)) + np.array([3.0, 0, 0, 0])
    assert frechet_distance(b, c) == pytest.approx(9.0, abs=0.1)
    assert frechet_distance(b, c) == pytest.approx(frechet_distance(c, b), rel=1e-6)
    images = real_digit_images()[0]
    noise = np.random.default_rng(1).integers(0, 256, images[:300].shape, dtype=np.uint8)
    assert digit_fd(images[:300]) * 10 < digit_fd(noise)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # dead ReLU units: singular Σ
def test_frechet_distance_equals_an_independent_computation_on_digit_features():
    """FD of two sets of classifier features = ‖μ₁−μ₂‖² + tr(Σ₁+Σ₂−2(Σ₁Σ₂)^{1/2}), by scipy's sqrtm."""
    from scipy import linalg

    images, _ = real_digit_images()
    features = digit_classifier().features(images)
    a, b = features[:900], features[900:]
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    expected = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6, abs=1e-8)


def test_psnr_and_ssim_equal_scikit_image():
    """PSNR and SSIM (7x7 uniform window) against scikit-image's implementations, per image."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(3)
    reference = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    noisy = np.clip(reference.astype(int) + rng.integers(-40, 41, reference.shape), 0, 255).astype(np.uint8)
    expected_psnr = [peak_signal_noise_ratio(r, x, data_range=255) for r, x in zip(reference, noisy)]
    expected_ssim = [
        structural_similarity(r, x, win_size=7, data_range=255, channel_axis=-1) for r, x in zip(reference, noisy)
    ]
    np.testing.assert_allclose(psnr(noisy, reference), expected_psnr, rtol=1e-10)
    np.testing.assert_allclose(ssim(noisy, reference), expected_ssim, rtol=1e-6)


def test_psnr_and_ssim_values():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    b = a.astype(int).copy()
    b[0] += 10  # uniform offset of 10 -> MSE 100 -> PSNR = 10 log10(255²/100)
    b = np.clip(b, 0, 255).astype(np.uint8)
    expected = 10 * np.log10(255**2 / np.mean((a[0].astype(float) - b[0]) ** 2))
    assert psnr(b, a)[0] == pytest.approx(expected)
    assert np.isinf(psnr(a, a)).all() and mean_psnr(a, a) == 100.0
    assert ssim(a, a) == pytest.approx(np.ones(3))
    assert (ssim(b, a) <= 1.0).all() and ssim(b, a)[0] < 1.0
    with pytest.raises(ValueError, match="equal shape"):
        psnr(a, a[:2])
