"""Released Wan weights: Wan2.1-T2V-1.3B, Causal-Forcing and ARL2 checkpoints (issue 13).

Import writes a project checkpoint (orbax, with this config) from `weights.path`:

  python main.py --mode=import --config=configs/wan.py:wan1_3b --workdir=runs/wan \\
      --config.weights.path=checkpoints/causal_forcing.pt

  # an ARL2 checkpoint in the authors' layout (hybrid layers as they were trained):
  python main.py --mode=import --config=configs/wan.py:arl2 --workdir=runs/arl2 \\
      --config.weights.path=ARL2.pt --config.model.hybrid.layers='(0, 1, ...)'

Variants (`--config=configs/wan.py:VARIANT`):
  wan1_3b     Wan2.1-T2V-1.3B shapes, all 30 layers softmax (block-causal): Wan2.1 itself, the
              Causal-Forcing chunk-wise model, or the teacher of a conversion
  arl2        the same shapes with ARL2's 75% hybrid layers (the earliest 22) and the authors'
              stage-2 LoRA (rank 16, alpha 32, memory branch and hybrid MLPs, authors' init);
              importing a softmax file here initialises the new parameters as conversion does
  tiny        the tiny random model of tests/fixtures/dit (2 layers, width 32, 2 heads of 16)
  tiny_arl2   tiny with layer 0 hybrid and rank-4 LoRA (tests/fixtures/dit/arl2)
  tiny_t2v    tiny with the text width of the tiny umT5 (tests/fixtures/t2v: the end-to-end
              text-to-video command on CPU)

Text to video (after the import):

  python main.py --mode=sample --config=configs/wan.py:wan1_3b --workdir=runs/wan \\
      --config.t2v.weights_dir=Wan2.1-T2V-1.3B --config.t2v.prompt='a cat walks on the grass'


Latents (the Wan VAE alone; hybrid_video/modes/codec.py):

  python main.py --mode=encode --config=configs/wan.py:wan1_3b --workdir=runs/latents \\
      --config.t2v.weights_dir=Wan2.1-T2V-1.3B --config.data.folder=videos/
  python main.py --mode=decode --config=configs/wan.py:wan1_3b --workdir=runs/latents \\
      --config.t2v.weights_dir=Wan2.1-T2V-1.3B --config.codec.latents=clip.npy

`weights` fields are read by hybrid_video/weights/wan_dit.py; the layouts and key names are in
its module docstring and in hybrid_video/weights/wan_dit_keys.py.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from configs import default


def weights_config() -> ml_collections.ConfigDict:
  w = ml_collections.ConfigDict()
  w.path = placeholder(str)    # weights file or folder: original Wan folder (config.json +
  #                              safetensors), diffusers root or transformer/, a `.pt`/`.pth`,
  #                              or a `.pt` converted by scripts/pth_to_safetensors.py
  w.layout = "auto"            # "auto" (from the key names), "original", "diffusers", "pt"
  w.pt_key = "generator_ema"   # entry of a Causal-Forcing / ARL2 `.pt` dict: "generator_ema"
  #                              or "generator"
  w.dtype = "float32"          # storage of the matrices: "float32" or "bfloat16" (biases,
  #                              norms, modulation tables and gates stay float32)
  w.init_seed = 0              # seed of parameters the file lacks (hybrid params of a softmax
  #                              file, LoRA); equal to convert.seed gives conversion's values
  return w


def t2v_config() -> ml_collections.ConfigDict:
  """Text to video in --mode=sample (hybrid_video/modes/sample_text.py)."""
  t = ml_collections.ConfigDict()
  t.weights_dir = placeholder(str)  # the Wan2.1 folder: Wan2.1_VAE.pth,
  #                              models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ (original) or
  #                              vae/, text_encoder/, tokenizer/ (diffusers)
  t.vae = placeholder(str)     # explicit VAE file/folder (overrides weights_dir)
  t.text_encoder = placeholder(str)  # explicit umT5 weights (overrides weights_dir)
  t.tokenizer = placeholder(str)  # explicit tokenizer folder or file (overrides weights_dir)
  t.prompt = placeholder(str)  # one prompt, or a schedule '0:"a cat walks" 120:"it sits"'
  #                              (video frames; a switch applies at the next chunk start)
  t.prompt_file = placeholder(str)  # one prompt or schedule per line: one video each, seed
  #                              sampler.seed + line index
  t.text_dtype = "bfloat16"    # umT5 compute and storage dtype ("float32" for exactness)
  t.vae_dtype = "float32"      # VAE compute dtype ("bfloat16" halves its memory)
  return t


def codec_config() -> ml_collections.ConfigDict:
  """--mode=encode / --mode=decode (hybrid_video/modes/codec.py); the VAE is t2v.vae or the one
  in t2v.weights_dir, computing in t2v.vae_dtype."""
  v = ml_collections.ConfigDict()
  v.batch_size = 8             # encode: clips per VAE call (a multiple of the mesh's data x fsdp
  #                              devices shards them; the last batch may be smaller)
  v.use_mesh = True            # encode: shard each batch over the mesh's batch axes
  v.test_fraction = 0.0        # encode: fraction of the videos whose clips form a 'test' split
  v.latents = placeholder(str)  # decode: a .npy of normalised latents [t, h, w, z] or
  #                              [1, t, h, w, z], or a latent_clips dataset directory
  v.split = "train"            # decode from a dataset: its split ...
  v.index = 0                  # ... and clip
  v.chunk_latents = 3          # decode: latents per streaming step (the DiT's chunk)
  v.output = placeholder(str)  # decode: output name (default: the input's) in <workdir>/decoded
  return v


def lora_config(rank: int) -> ml_collections.ConfigDict:
  """The ARL2 authors' stage-2 LoRA: memory-branch q, k, v and the hybrid layers' MLPs."""
  return ml_collections.ConfigDict({
      "rank": rank,            # LoRA rank (authors: 16)
      "alpha": 32.0,           # the delta is scaled by alpha / rank (authors: 32)
      "mlp": True,             # on the hybrid layers' MLP linears
      "memory": True,          # on the memory branch's q, k, v inputs
      "init": "authors",       # A ~ U(+-1/sqrt(rank)) (authors' Kaiming on [dim, rank])
  })


def tiny_model(c: ml_collections.ConfigDict) -> None:
  """The shapes of scripts/fixtures/make_dit.py's diffusers model."""
  m = c.model
  m.in_channels = m.out_channels = 4
  m.patch_size = (1, 2, 2)
  m.frames_per_chunk = 2
  m.dim = 32
  m.num_layers = 2
  m.num_heads = 2              # head dim 16: RoPE bands 8/4/4
  m.mlp_dim = 64
  m.freq_dim = 64
  m.text_dim = 24
  m.dtype = "float32"
  m.remat = False
  m.gdn_chunk_size = 16
  c.data.frame_size = (8, 8)
  c.data.channels = 4
  c.data.num_frames = 6
  c.compile.cond_tokens = 10


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config of variant `arg` (see module docstring)."""
  variant = arg or "wan1_3b"
  c = default.get_config("wan1_3b")
  c.weights = weights_config()
  c.model.hybrid.ratio = 0.0
  c.data.source = "video_folder"  # latents are not bundled; the frame size describes them
  c.data.frame_size = (60, 104)   # 480x832 pixels / VAE stride 8
  c.data.channels = 16
  c.data.num_frames = 21          # the clip Causal-Forcing was trained on
  c.compile.cond_tokens = 512     # umT5 text length
  c.mesh.data = 1
  c.mesh.fsdp = -1                # parameters sharded over all devices
  c.t2v = t2v_config()
  c.codec = codec_config()
  c.video_fps = 16                # Wan's frame rate
  c.video_upscale = 1
  if variant == "wan1_3b":
    pass
  elif variant == "arl2":
    c.model.hybrid.ratio = 0.75
    c.model.lora = lora_config(16)
  elif variant == "tiny":
    tiny_model(c)
  elif variant == "tiny_t2v":     # scripts/fixtures/make_t2v.py: text width of the tiny umT5
    tiny_model(c)
    c.model.text_dim = 32
    c.data.frame_size = (4, 4)     # 32x32 pixels through the tiny VAE
    c.t2v.text_dtype = "float32"
  elif variant == "tiny_arl2":
    tiny_model(c)
    c.model.hybrid.layers = (0,)
    c.model.lora = lora_config(4)
  else:
    raise ValueError(f"unknown config variant {variant!r}; choose wan1_3b, arl2, tiny, "
                     "tiny_arl2, tiny_t2v")
  return c
