"""Evaluation: FID / IS arithmetic against independent formulas, the ADM reader, the eval command."""

import json
import subprocess
import warnings
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from mosaic_core.conquer.evaluation import (
    FeatureStatistics,
    frechet_distance_from_statistics,
    inception_score,
    load_image_set,
)

ROOT = Path(__file__).resolve().parent.parent


def reference_fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID the way pytorch-fid writes it: a general matrix square root (scipy.linalg.sqrtm) of Σa Σb."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    sigma_a, sigma_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)  # dead ReLU features: singular Σ is expected
        covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma_a)) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


def reference_inception_score(p: np.ndarray, splits: int) -> tuple[float, float]:
    """IS as in Salimans et al.'s code: exp(mean_x Σ_y p(y|x) (log p(y|x) − log p(y))) per split."""
    scores = []
    n = len(p)
    for k in range(splits):
        part = p[k * n // splits : (k + 1) * n // splits]
        py = part.mean(axis=0)
        scores.append(np.exp(np.mean([np.sum(row * (np.log(row) - np.log(py))) for row in part])))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.slow  # fits the digit classifier (seconds alone, a minute on a loaded 2-core machine)
def test_fid_equals_an_independent_sqrtm_computation_on_digit_features():
    from mosaic_core.conquer.metrics import digit_classifier, real_digit_images

    images, labels = real_digit_images()
    features = digit_classifier().features(images)  # 1797 × 64, the digit model's feature space
    rng = np.random.default_rng(0)
    noisy = np.clip(images.astype(int) + rng.integers(-60, 60, images.shape), 0, 255).astype(np.uint8)
    noisy_features = digit_classifier().features(noisy)
    cases = [
        (features[labels < 5], features[labels >= 5]),  # two halves of the real digits
        (features, noisy_features),  # real against corrupted
    ]
    for a, b in cases:
        ours = frechet_distance_from_statistics(FeatureStatistics.of(a), FeatureStatistics.of(b))
        assert ours == pytest.approx(reference_fid(a, b), rel=1e-6, abs=1e-8)
        assert ours > 0.1
    same = FeatureStatistics.of(features)
    assert frechet_distance_from_statistics(same, same) == pytest.approx(0.0, abs=1e-6)


def test_inception_score_matches_the_reference_formula():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(200, 12)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert inception_score(p, 10) == pytest.approx(reference_inception_score(p, 10), rel=1e-9)
    # one-hot, evenly spread over 12 classes in every split: IS = number of classes
    uniform = np.eye(12)[np.arange(120) % 12]
    assert inception_score(uniform, 10)[0] == pytest.approx(12.0, rel=1e-6)


def test_adm_reference_reader(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    mu, sigma = rng.normal(size=4), np.eye(4) * 2.0
    np.savez(tmp_path / "adm.npz", images, mu=mu, sigma=sigma)  # positional -> arr_0, as ADM writes it
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "bad.npz", something=np.zeros(3))
    batch = load_image_set(tmp_path / "adm.npz")
    np.testing.assert_array_equal(batch.images, images)
    np.testing.assert_array_equal(batch.statistics.mu, mu)
    np.testing.assert_array_equal(batch.statistics.sigma, sigma)
    stats_only = load_image_set(tmp_path / "stats.npz")
    assert stats_only.images is None and stats_only.statistics.sigma.shape == (4, 4)
    with pytest.raises(ValueError, match=r"neither images .* nor statistics .*found \['something'\]"):
        load_image_set(tmp_path / "bad.npz")
    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="expected uint8 images"):
        load_image_set(tmp_path / "float.npz")


def test_image_folder_reader(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 6, 5, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i:03d}.png")
    np.testing.assert_array_equal(load_image_set(tmp_path).images, images)


def _eval(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mosaic_core", "eval", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "MOSAIC_INCEPTION": ""},
    )


def test_eval_without_inception_weights_exits_2_with_one_line(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.zeros(4, np.int64))
    done = _eval(str(tmp_path / "a.npz"), "--reference", str(tmp_path / "a.npz"), "--inception", str(tmp_path / "none.pt"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "none.pt" in lines[0] and "inception-2015-12-05.pt" in lines[0] and "nothing is downloaded" in lines[0]


@pytest.mark.parametrize("missing", ["images", "reference"])
def test_eval_names_a_missing_image_file_before_asking_for_inception_weights(tmp_path, missing):
    """A mistyped path is the error, not the absent Inception file a user would then go looking for."""
    from conftest import run_cli

    np.savez(tmp_path / "a.npz", images=np.zeros((4, 8, 8, 3), np.uint8), labels=np.zeros(4, np.int64))
    images, reference = tmp_path / "a.npz", tmp_path / "a.npz"
    if missing == "images":
        images = tmp_path / "typo.npz"
    else:
        reference = tmp_path / "typo-folder"
    done = run_cli("eval", str(images), "--metric", "fid", "--reference", str(reference), "--inception", str(tmp_path / "none.pt"))
    assert done.returncode == 2
    assert "no such image file or folder" in done.stderr and "typo" in done.stderr, done.stderr
    assert "none.pt" not in done.stderr and "Inception" not in done.stderr


@pytest.mark.parametrize("shape", [(2, 16, 16, 3), (2, 12, 12, 1)])
def test_digit_metrics_on_other_images_say_which_metrics_serve_them(tmp_path, shape):
    from conftest import run_cli

    np.savez(tmp_path / "rgb.npz", images=np.zeros(shape, np.uint8), labels=np.zeros(2, np.int64))
    done = run_cli("eval", str(tmp_path / "rgb.npz"), "--metric", "digits")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "digits-dit" in done.stderr and "--metric fid,is" in done.stderr and str(shape[1]) in done.stderr, done.stderr


class TinyDetector(torch.nn.Module):
    """A stand-in with the FID Inception's TorchScript interface (features / bias-free softmax)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Linear(48, 16)
        self.logits = torch.nn.Linear(16, 10)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False):
        x = torch.nn.functional.adaptive_avg_pool2d(img / 255.0, 4).flatten(1)  # N×48
        f = torch.relu(self.features(x))
        if return_features:
            return f
        logits = f @ self.logits.weight.T if no_output_bias else self.logits(f)
        return torch.softmax(logits, dim=1)


def test_eval_command_with_a_torchscript_detector(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is the detector file's format
        detector = torch.jit.script(TinyDetector())
    detector.save(str(tmp_path / "detector.pt"))
    rng = np.random.default_rng(4)
    generated = rng.integers(0, 256, (30, 12, 12, 3), dtype=np.uint8)
    reference = np.clip(generated.astype(int) + 40, 0, 255).astype(np.uint8)[:25]
    np.savez(tmp_path / "gen.npz", images=generated, labels=np.zeros(30, np.int64))
    np.savez(tmp_path / "ref.npz", reference)  # ADM layout: arr_0 only
    done = _eval(
        str(tmp_path / "gen.npz"), "--reference", str(tmp_path / "ref.npz"), "--inception", str(tmp_path / "detector.pt"),
        "--batch-size", "7", "--device", "cpu", "--out", str(tmp_path / "out.json"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "out.json").read_text())

    def run(images, **kwargs):
        with torch.no_grad():
            return detector(torch.from_numpy(images).permute(0, 3, 1, 2).float(), **kwargs).double().numpy()

    assert result["fid"] == pytest.approx(reference_fid(run(generated, return_features=True), run(reference, return_features=True)), rel=1e-6)
    expected_is = reference_inception_score(run(generated, no_output_bias=True), 10)
    assert (result["is"], result["is_std"]) == pytest.approx(expected_is, rel=1e-6)
    assert result["count"] == 30 and result["reference_statistics"] == "computed"


@pytest.mark.slow  # fits the digit classifier (seconds alone, a minute on a loaded 2-core machine)
def test_eval_digit_metrics_through_the_same_command(tmp_path):
    from mosaic_core.conquer.evaluation import digit_metrics
    from mosaic_core.conquer.metrics import real_digit_images

    images, labels = real_digit_images()
    noise = np.random.default_rng(5).integers(0, 256, (200, 16, 16, 1), dtype=np.uint8)
    real_result, noise_result = digit_metrics(images[:200], labels[:200]), digit_metrics(noise, labels[:200])
    assert real_result["accuracy"] > 0.9 and noise_result["accuracy"] < 0.4  # 10 classes: chance is 0.1
    assert noise_result["fd"] > 10 * real_result["fd"]
    np.savez(tmp_path / "real.npz", images=images[:200], labels=labels[:200])
    done = _eval(str(tmp_path / "real.npz"), "--model", "digits-dit", "--out", str(tmp_path / "real.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    command_result = json.loads((tmp_path / "real.json").read_text())
    assert command_result["accuracy"] == pytest.approx(real_result["accuracy"])
    assert command_result["fd"] == pytest.approx(real_result["fd"], rel=1e-9)


def _tiny_clip_folder(folder: Path) -> Path:
    """A tiny real CLIPModel built from a config, with a word-level tokenizer written here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "a", "red", "blue", "square", "circle", "dot", "</s>"]
    vocab = {word: i for i, word in enumerate(words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    text = dict(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, eos_token_id=vocab["</s>"], pad_token_id=0)
    vision = dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    model.save_pretrained(folder)
    wrapped.save_pretrained(folder)
    return folder


def test_clip_refuses_a_text_encoder_folder_in_one_line(tmp_path):
    """--clip given a pipeline's text_encoder/ (a CLIPTextModel, no vision tower) used to end in a
    transformers traceback; it is one line naming what the folder holds and what is needed."""
    from conftest import run_cli
    from transformers import CLIPTextConfig, CLIPTextModel

    encoder = tmp_path / "text_encoder"
    CLIPTextModel(CLIPTextConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=8)).save_pretrained(encoder)
    np.savez(tmp_path / "gen.npz", images=np.zeros((2, 16, 16, 3), np.uint8), labels=np.zeros(2, np.int64))
    (tmp_path / "prompts.txt").write_text("a red fox\n")
    done = run_cli("eval", str(tmp_path / "gen.npz"), "--metric", "clip", "--clip", str(encoder),
                   "--prompts", str(tmp_path / "prompts.txt"), "--device", "cpu")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: --clip {encoder} holds model_type 'clip_text_model', not a full CLIP model")
    assert 'model_type "clip", a vision and a text tower' in line


@pytest.mark.slow  # two eval processes that import transformers
def test_clip_score_command_equals_cosines_of_the_models_own_towers(tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    folder = _tiny_clip_folder(tmp_path / "clip")
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)  # already CLIP's size: no resize
    prompts = ["a red square", "a blue circle", "a red dot", "a blue square", "a circle", "red blue dot"]
    np.savez(tmp_path / "gen.npz", images=images, labels=np.zeros(6, np.int64))
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    done = _eval(str(tmp_path / "gen.npz"), "--metric", "clip", "--clip", str(folder), "--prompts",
                 str(tmp_path / "prompts.txt"), "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "out.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "out.json").read_text())

    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    pixels = torch.from_numpy(((images / 255.0 - mean) / std).transpose(0, 3, 1, 2)).float()
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).double().numpy()
        text = model.text_projection(
            model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        ).double().numpy()
    cosine = (image * text).sum(1) / np.linalg.norm(image, axis=1) / np.linalg.norm(text, axis=1)
    assert result["clip"] == pytest.approx(100 * np.maximum(cosine, 0).mean(), rel=1e-4, abs=1e-4)

    missing = _eval(str(tmp_path / "gen.npz"), "--prompts", str(tmp_path / "prompts.txt"), "--metric", "clip")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "CLIP weights not found" in missing.stderr and "nothing is downloaded" in missing.stderr
