"""ARL2 on the exact Wan2.1-T2V-1.3B shapes: 30 layers of width 1536 (12 heads of 128, MLP
8960), 75% hybrid layers (the earliest 22), 480x832 video -> 60x104 latents with 16 channels,
patch (1, 2, 2) -> 1560 tokens per latent frame, 3 latent frames (4680 tokens) per chunk.

Ahead-of-time compile on 8 fake CPU devices (no allocation, no run):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python main.py --mode=compile --config=configs/arl2_wan1_3b.py --workdir=runs/aot_wan

On a GPU node or TPU slice, pick the mesh with --config.mesh.*; see README "Scaling out".
Training it needs a latent dataset (not bundled); this config is for compile/memory planning
and conversion shapes.
"""

from configs import default


def get_config(arg=None):
  c = default.get_config("wan1_3b")
  c.data.source = "video_folder"  # latents are not bundled; only the frame size is used here
  c.data.frame_size = (60, 104)   # 480x832 pixels / VAE stride 8
  c.data.channels = 16
  c.data.num_frames = 6           # 2 chunks of 3 latent frames
  c.train.batch_size = 8          # one clip per device on 8 devices
  c.mesh.data = 1
  c.mesh.fsdp = -1                # parameters, optimizer state and EMA fully sharded
  c.compile.clip_chunks = 2       # teacher forcing over [2 clean ; 2 noisy] chunks
  c.compile.cond_tokens = 512     # umT5 text length in Wan
  c.compile.sample_batch = 1
  c.sampler.cache_chunks = 7      # K/V cache of the 6 softmax layers: 21 latent frames
  if arg:
    raise ValueError(f"configs/arl2_wan1_3b.py has no variants, got {arg!r}")
  return c
