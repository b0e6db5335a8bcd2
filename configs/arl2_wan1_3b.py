"""ARL2 on the exact Wan2.1-T2V-1.3B shapes at the paper's training shapes: 30 layers of width
1536 (12 heads of 128, MLP 8960), 75% hybrid layers (the earliest 22; 8 softmax), 480x832 video
-> 60x104 latents with 16 channels, patch (1, 2, 2) -> 1560 tokens per latent frame, 3 latent
frames (4680 tokens) per chunk; training clips of 7 chunks (21 latent frames), batch 1 per
device on fsdp=8, bf16 compute, remat; the sampler against a 231-latent-frame history (the
paper's 921 frames).

Ahead-of-time compile of every step a user runs at scale, on 8 fake CPU devices (no
allocation, no run; the figures are in the README's scale section):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python main.py --mode=compile --config=configs/arl2_wan1_3b.py --workdir=runs/aot_wan

On a GPU node or TPU slice, pick the mesh with --config.mesh.*; see README "Scaling out". By
this estimate a clip per device (fsdp=8) needs 45.9 GiB per device for the train step, 28.5
for conversion stage 1, 46.1 and 54.0 for stage 2 (teacher forcing, rollout) and 32.8 for the
sampler step (model.scan_layers and remat, both on here).
Training it needs latent clips (--mode=encode); this config is for compile/memory planning
and conversion shapes.
"""

from configs import convert, default, wan


def get_config(arg=None):
  c = default.get_config("wan1_3b")
  c.data.source = "video_folder"  # latents are not bundled; only the frame size is used here
  c.data.frame_size = (60, 104)   # 480x832 pixels / VAE stride 8
  c.data.channels = 16
  c.data.num_frames = 21          # the paper's clip: 7 chunks of 3 latent frames
  c.train.batch_size = 8          # one clip per device on 8 devices
  c.mesh.data = 1
  c.mesh.fsdp = -1                # parameters, optimizer state and EMA fully sharded
  c.compile.clip_chunks = 7       # teacher forcing over [7 clean ; 7 noisy] chunks
  c.compile.cond_tokens = 512     # umT5 text length in Wan
  c.compile.sample_batch = 1
  c.compile.steps = ("train", "stage1", "stage2_tf", "stage2_rollout", "sample", "vae_decode")
  c.sampler.cache_chunks = 77     # K/V cache of the 8 softmax layers: 231 latent frames
  # Conversion: this model's shapes as the all-softmax teacher, the student 75% hybrid with the
  # authors' stage-2 LoRA; the frozen teacher stored in bf16.
  c.convert = convert.convert_config()
  c.convert.hybrid.ratio = 0.75
  c.convert.teacher_dtype = "bfloat16"
  c.convert.stage1.batch_size = c.convert.stage2.batch_size = c.train.batch_size
  c.convert.stage2.rollout.num_chunks = 7   # a rollout as long as a training clip
  c.convert.stage2.rollout.grad_chunks = 1  # truncated backprop through the last chunk
  c.t2v = wan.t2v_config()        # the VAE's compute dtype for the vae_decode step
  if arg:
    raise ValueError(f"configs/arl2_wan1_3b.py has no variants, got {arg!r}")
  return c
