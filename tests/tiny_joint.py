"""Tiny joint-attention pipelines (SD3, Flux) built from configs, with tokenizers written here."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import write_clip_tokenizer


def write_t5_tokenizer(folder, max_length: int = 512):
    """A Unigram T5 tokenizer built from a vocabulary list (no sentencepiece): returns it loaded."""
    from transformers import T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("▁" + w, -1.0) for w in ("a", "the", "red", "fox", "at", "koi")]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return T5Tokenizer.from_pretrained(folder)


def _text_encoders(tokenizer_folder, clip_class_2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer = write_clip_tokenizer(f"{tokenizer_folder}/tokenizer")
    tokenizer_2 = write_clip_tokenizer(f"{tokenizer_folder}/tokenizer_2")
    t5_tokenizer = write_t5_tokenizer(f"{tokenizer_folder}/tokenizer_t5")
    clip = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=32, hidden_act="gelu",
    )
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=64, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 pad_token_id=0, eos_token_id=1)).eval()
    return tokenizer, tokenizer_2, t5_tokenizer, CLIPTextModelWithProjection(CLIPTextConfig(**clip)).eval(), \
        clip_class_2(CLIPTextConfig(**clip)).eval(), t5, CLIPTextModel


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=1.5, shift_factor=0.1,
    ).eval()


SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}


def tiny_sd3_parts(tokenizer_folder, seed: int = 0, dual: bool = True):
    """A tiny SD3(.5): 3 joint blocks (4 heads of 8, block 0 with a dual attention, the last
    context_pre_only), rms q/k norms, two 32-wide CLIPs + a 64-wide T5, a 16 px VAE (8×8×4 latents)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2, tokenizer_3, text_encoder, text_encoder_2, text_encoder_3, _ = _text_encoders(
        tokenizer_folder, CLIPTextModelWithProjection)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4, pos_embed_max_size=8,
        dual_attention_layers=(0,) if dual else (), qk_norm="rms_norm",
    ).eval()
    return dict(transformer=transformer, vae=_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                text_encoder_3=text_encoder_3, tokenizer=tokenizer, tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3,
                scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER))


FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def tiny_flux_parts(tokenizer_folder, seed: int = 0, guidance: bool = True):
    """A tiny Flux: 2 double-stream + 2 single-stream blocks (4 heads of 8, MLP 128), a
    32-wide CLIP (pooled) + 64-wide T5, a 16 px VAE (8×8×4 latents, 4×4 packed tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer, _, tokenizer_2, _, text_encoder, text_encoder_2, _ = _text_encoders(tokenizer_folder, CLIPTextModel)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4),
    ).eval()
    return dict(transformer=transformer, vae=_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER))


def random_keeps(adapter, model, seed: int, fraction: float = 0.5):
    """A `BlockKeep` per block keeping a random ≥1 subset of each layer's groups (seeded)."""
    from mosaic_core.models.adapters.base import KEEP_FIELDS
    from mosaic_core.prune.surgery import BlockKeep

    generator = torch.Generator().manual_seed(seed)
    by_block: dict[int, dict] = {}
    for layer in adapter.prunable_layers(model):
        count = max(1, int(round(layer.num_groups * fraction)))
        kept = sorted(torch.randperm(layer.num_groups, generator=generator)[:count].tolist())
        by_block.setdefault(layer.block, {})[KEEP_FIELDS[layer.kind]] = tuple(kept)
    return [BlockKeep(**by_block[b]) for b in sorted(by_block)]


def check_reuse_against_hooks(model, call, inputs_full, inputs_cached, cached_paths):
    """DeepCache-style reuse on a joint-block model, against a reference built with hooks.

    `call(model, inputs)` makes one denoiser call. The reference records, at the full call,
    each of `cached_paths`' two streams in and out; at the cached call it lets the blocks
    run but hooks replace each one's output with its inputs plus the full call's
    (context, image) residual. `BlockReuse(interval 2, keep first/last 1)` must give the
    same output, and must not run the cached blocks at all.
    """
    from mosaic_core.conquer.caching import BlockReuse, CacheConfig

    blocks = [model.get_submodule(path) for path in cached_paths]
    residuals = {}

    def record(index):
        def hook(module, args, kwargs, out):
            encoder, hidden = kwargs.get("encoder_hidden_states"), kwargs["hidden_states"]
            residuals[index] = (None if out[0] is None else out[0] - encoder, out[1] - hidden)
        return hook

    def replay(index):
        def hook(module, args, kwargs, out):
            encoder, hidden = kwargs.get("encoder_hidden_states"), kwargs["hidden_states"]
            r_encoder, r_hidden = residuals[index]
            return (None if r_encoder is None else encoder + r_encoder, hidden + r_hidden)
        return hook

    hooks = [block.register_forward_hook(record(i), with_kwargs=True) for i, block in enumerate(blocks)]
    full_reference = call(model, inputs_full)
    for hook in hooks:
        hook.remove()
    hooks = [block.register_forward_hook(replay(i), with_kwargs=True) for i, block in enumerate(blocks)]
    cached_reference = call(model, inputs_cached)
    for hook in hooks:
        hook.remove()
    dense_cached = call(model, inputs_cached)

    runs = []
    counters = [block.attn.register_forward_hook(lambda m, a, o: runs.append(1)) for block in blocks]
    wrapped = BlockReuse(model, CacheConfig(interval=2, keep_first=1, keep_last=1))
    full = call(wrapped, inputs_full)
    ran_full = len(runs)
    cached = call(wrapped, inputs_cached)
    for hook in counters:
        hook.remove()
    assert wrapped.history == [True, False]
    assert (ran_full, len(runs)) == (len(blocks), len(blocks))  # the cached call ran none of them
    torch.testing.assert_close(full, full_reference, rtol=0, atol=0)
    torch.testing.assert_close(cached, cached_reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cached, dense_cached, rtol=1e-4, atol=1e-5)  # reuse really changed the call
