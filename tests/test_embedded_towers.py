"""PE towers inside other models: a PerceptionLM's PE-Lang tower and PE-AV's PE-Core frame encoder.

The peers are transformers models built offline from their configs (tiny Llama / ModernBERT text towers, a
two-block timm `vit_pe_*` vision tower at the real width and resolution, so that the preset is detected
from the shapes), every tensor randomized, saved with `save_pretrained`.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import doc_blocks
import numpy as np
import pytest
import torch
from peers import compare, randomize_
from safetensors.numpy import load_file

import pe_jax
from pe_jax.checkpoints.naming import NAMINGS
from pe_jax.convert.convert import convert_checkpoint

DEPTH = 2  # blocks of the tiny towers; the converter reads the depth from the file
PLM_TOWER = "model.vision_tower.timm_model."


def _run_readme_block(section: str, cwd: Path) -> list[str]:
    """Runs the bash block of docs section `section` (docs/conversion.md) in `cwd` as written; returns its
    stdout lines."""
    block = doc_blocks.block(section, "bash")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()


def _plm(path):
    """A tiny PerceptionLM the way transformers' converter builds PLM-1B/3B's tower (PE-Lang-L14-448), saved
    in bfloat16 (as PLM ships) and sharded (a safetensors index); returned in float32."""
    from transformers import LlamaConfig, PerceptionLMConfig, PerceptionLMForConditionalGeneration, TimmWrapperConfig

    vision = TimmWrapperConfig(architecture="vit_pe_core_large_patch14_336", model_args=dict(
        embed_dim=1024, depth=DEPTH, img_size=(448, 448), global_pool="", use_post_transformer_norm=False,
        init_values=0.1, ref_feat_shape=(32, 32)))
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)
    cfg = PerceptionLMConfig(vision_config=vision, text_config=text, vision_use_cls_token=True,
                             projector_pooling_ratio=2)
    model = randomize_(PerceptionLMForConditionalGeneration(cfg), seed=5)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path, max_shard_size="20MB")
    with torch.no_grad():  # the peer computes in float32 from the weights as saved (not its RoPE buffers)
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


def _pe_video(path):
    """A tiny PE-AV video model (transformers PeVideoModel): its frame encoder is a PE-Core-L14-336 timm tower
    with attention pooling and a 1024 -> 1024 head."""
    from transformers import PeVideoConfig, PeVideoModel, TimmWrapperConfig

    vision = TimmWrapperConfig(architecture="vit_pe_core_large_patch14_336", do_pooling=True, num_classes=1024,
                               num_labels=1024, global_pool="map", model_args={"depth": DEPTH})
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    video = dict(vision_config=vision, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, head_dim=16)
    model = randomize_(PeVideoModel(PeVideoConfig(text_config=text, video_config=video)), seed=6)
    model.save_pretrained(path)
    return model


def _images(size, seed=0):
    return np.random.default_rng(seed).standard_normal((1, size, size, 3)).astype(np.float32)


def _torch(module, x):
    with torch.inference_mode():
        return module(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))


@pytest.mark.slow  # two 448 px L/14 blocks in PyTorch and JAX
def test_perception_lm_converts_matches_its_vision_tower_and_round_trips(tmp_path):
    plm = _plm(tmp_path / "Perception-LM-1B")
    assert (tmp_path / "Perception-LM-1B" / "model.safetensors.index.json").exists()  # sharded
    lines = _run_readme_block("## PerceptionLM", tmp_path)
    assert lines[0].startswith(f"wrote plm-tower/: PE-Lang-L14-448 with {DEPTH} blocks (the file's depth)")
    assert "(safetensors (sharded)/perception_lm, float32)" in lines[0]  # bf16 file, float32 by default
    # The projector and the language model are reported, in one line, as left out.
    assert lines[1].startswith("left out ") and "model.multi_modal_projector.* (4)" in lines[1]
    assert "model.language_model.*" in lines[1] and "lm_head.weight (1)" in lines[1]
    meta = json.loads((tmp_path / "plm-tower" / "pe_jax.json").read_text())
    assert meta["config"]["layers"] == DEPTH and meta["unused_tensors"]["model.multi_modal_projector.*"] == 4

    model = pe_jax.load_model(tmp_path / "plm-tower")
    x = _images(448)
    theirs = _torch(plm.model.vision_tower, x).last_hidden_state.numpy()  # every token, no final norm
    _, rel = compare(model.forward_features(x), theirs)
    assert rel <= 1e-5, rel

    back = load_file(str(tmp_path / "vision_tower.safetensors"))  # exported in bfloat16
    before = {k: v for k, v in plm.state_dict().items() if k.startswith(PLM_TOWER)}
    assert sorted(back) == sorted(before)
    for k, v in before.items():
        assert str(back[k].dtype) == "bfloat16", k
        np.testing.assert_array_equal(back[k].astype(np.float32), v.float().numpy(), err_msg=k)


@pytest.mark.slow  # two 336 px L/14 blocks in PyTorch and JAX
def test_pe_av_frame_encoder_loads_into_pe_core_l14_336(tmp_path):
    pev = _pe_video(tmp_path / "pe-av-large")
    lines = _run_readme_block("## PE-AV", tmp_path)
    assert lines[0].startswith(f"wrote pe-av-frames/: PE-Core-L14-336 with {DEPTH} blocks")
    assert "safetensors/pe_video" in lines[0] and "text_model.layers.*" in lines[1]
    model = pe_jax.load_model(tmp_path / "pe-av-frames")
    x = _images(336, seed=1)
    theirs = _torch(pev.video_encoder.embedder.vision_model, x).logits.numpy()  # pooled, through the head
    _, rel = compare(model(x), theirs)
    assert rel <= 1e-5, rel
    # Exported in PeAudioVideoModel's naming (the same tower one level deeper), bit for bit...
    back = load_file(str(tmp_path / "frames.safetensors"))
    tower = "video_encoder.embedder.vision_model.timm_model."
    before = {k: v.detach().numpy() for k, v in pev.state_dict().items() if k.startswith(tower)}
    assert sorted(back) == sorted(f"video_model.{k}" for k in before)
    for k, v in before.items():
        np.testing.assert_array_equal(back[f"video_model.{k}"], v, err_msg=k)
    # ...which converts again, as that naming.
    meta = convert_checkpoint(str(tmp_path / "frames.safetensors"), str(tmp_path / "again"), progress=False)
    assert meta["source_format"] == "safetensors/pe_audio_video" and meta["unused_tensors"] == {}


def _one_block_tower(preset: str, naming: str, dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    """A one-block vision tower of `preset` at random weights in `naming`, as a file of that naming holds it
    (every key, its PyTorch shape, in `dtype`): built from the preset's shapes and the naming's table, no
    model init. timm's `head.bias` is zero (the reference projection has none)."""
    from pe_jax.checkpoints.naming import slot_shape, slots
    from pe_jax.checkpoints.params import ParamSpec
    from pe_jax.checkpoints.transforms import ZeroBias
    from pe_jax.convert.convert import preset_shapes

    rng = np.random.default_rng(seed)
    shapes = {p: ParamSpec((1, *s.shape[1:]), s.dtype) if "resblocks" in p else s
              for p, s in preset_shapes("vision", preset).items()}
    return {s.torch_key: (rng.standard_normal(s.transform.torch_shape(slot_shape(shapes[s.path].shape, s.index)))
                          * (not isinstance(s.transform, ZeroBias))).astype(dtype)
            for s in slots(pe_jax.vision_config(preset, layers=1), naming, shapes)}


@pytest.mark.parametrize("naming", NAMINGS)
def test_a_bf16_file_of_each_naming_converts_in_float32_and_bfloat16_exactly(tmp_path, naming):
    """A bfloat16 safetensors file (PerceptionLM's dtype) of every naming of checkpoints/naming.py (a one-block
    T/16 tower) converts without --dtype (float32) and with --dtype bfloat16; either checkpoint holds the bf16
    values exactly: exported back in the naming, in its own dtype, every key equals the source's."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from pe_jax.convert.convert import export_checkpoint

    bf16 = np.dtype(ml_dtypes.bfloat16)
    source = _one_block_tower("PE-Core-T16-384", naming, bf16)
    save_file(source, str(tmp_path / "bf16.safetensors"))
    for dtype in ("float32", "bfloat16"):
        meta = convert_checkpoint(str(tmp_path / "bf16.safetensors"), str(tmp_path / dtype), dtype=dtype,
                                  progress=False)
        assert (meta["preset"], meta["dtype"], meta["source_format"]) == ("PE-Core-T16-384", dtype,
                                                                        f"safetensors/{naming}")
        export_checkpoint(str(tmp_path / dtype), str(tmp_path / f"{dtype}.safetensors"), format=naming)
        back = load_file(str(tmp_path / f"{dtype}.safetensors"))
        assert sorted(back) == sorted(source)
        for k, v in source.items():
            assert back[k].dtype == (np.float32 if dtype == "float32" else bf16), k
            np.testing.assert_array_equal(back[k].astype(np.float32), v.astype(np.float32), err_msg=k)


def test_meta_pe_av_release_converts_and_exports_back_bit_for_bit(tmp_path):
    """Meta's own PE-AV release (perception_models' PEAudioVisual, revision "perception_models" of
    facebook/pe-av-*): `audio_visual_model.visual_model.pe_encoder.` + the original vision keys. Detected,
    converted to PE-Core-L14-336 (the rest reported unused), exported back (`--format pe_av`) bit for bit."""
    from safetensors.numpy import save_file

    from pe_jax.convert.convert import export_checkpoint

    prefix, rng = "audio_visual_model.visual_model.pe_encoder.", np.random.default_rng(0)
    ours = _one_block_tower("PE-Core-L14-336", "original")  # a one-block PE-Core-L14-336 in the original naming
    rest = {f"{prefix}rope.freqs": rng.standard_normal(32), "audio_visual_model.visual_model.proj.weight":
            rng.standard_normal((8, 1024)), "text_model.embeddings.tok_embeddings.weight": rng.standard_normal((4, 8))}
    save_file({**{prefix + k: v for k, v in ours.items()}, **{k: v.astype(np.float32) for k, v in rest.items()}},
              str(tmp_path / "model.safetensors"))
    meta = convert_checkpoint(str(tmp_path / "model.safetensors"), str(tmp_path / "frames"), progress=False)
    assert meta["source_format"] == "safetensors/pe_av" and meta["config"]["layers"] == 1
    assert set(meta["unused_tensors"]) == {"audio_visual_model.visual_model.*", "text_model.embeddings.*"}
    export_checkpoint(str(tmp_path / "frames"), str(tmp_path / "back.safetensors"), format="pe_av")
    back = load_file(str(tmp_path / "back.safetensors"))
    assert sorted(back) == sorted(prefix + k for k in ours) and len(ours) == 31
    for k, v in ours.items():
        np.testing.assert_array_equal(back[prefix + k], v, err_msg=k)
