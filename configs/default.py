"""Default experiment: a tiny ARL2 model (75% hybrid layers) on the embedded Moving-Digits data.

Run (trains on CPU for a bounded time, then streams a long video into the workdir):

  python main.py --workdir=runs/default

Variants (`--config=configs/default.py:VARIANT`):
  arl2      the default: 75% hybrid layers, earliest layers hybrid
  softmax   all-softmax teacher (0% hybrid)
  hybrid100 every layer hybrid (constant-memory streaming)
  mixed     50% hybrid (earliest half)
  smoke     the whole main job in well under 2 minutes on 2 CPU cores
  wan1_3b   the exact Wan2.1-1.3B shapes (build abstractly; not for CPU training)
Any field can be overridden: --config.model.num_layers=6 --config.train.num_steps=100.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


def model_config() -> ml_collections.ConfigDict:
  """The model family: the tiny CPU model by default; see `wan1_3b_model` for paper shapes."""
  m = ml_collections.ConfigDict()
  m.in_channels = 1            # video channels (pixel space in the tiny configs; 16 latents in Wan)
  m.out_channels = 1           # predicted channels (flow velocity)
  m.patch_size = (1, 8, 8)     # (pt, ph, pw): Conv3d kernel = stride; 8x8 patches of the
  #                              32x32 frames = 16 tokens per frame (fast enough to learn
  #                              digits in minutes on 2 CPU cores; patch 4 costs ~4x per step)
  m.frames_per_chunk = 2       # F: video frames per autoregressive chunk
  m.dim = 96                   # model width
  m.num_layers = 4             # transformer blocks
  m.num_heads = 3              # attention heads; head dim = dim / num_heads
  m.mlp_dim = 256              # MLP hidden width
  m.freq_dim = 256             # sinusoidal timestep embedding size (Wan: 256)
  m.eps = 1e-6                 # LayerNorm / RMSNorm epsilon
  m.rope_theta = 10000.0       # RoPE base (Wan: 10000)
  m.prediction = "x0"          # what the head predicts: "velocity" (eps - x0; Wan and every
  #                              imported model) or "x0" (the clean video, returned as the
  #                              velocity (x_t - x0_hat) / t). x0 here: 8x8 patches are large
  #                              for width 96, and clean frames are easier to predict than
  #                              noise (Li & He 2025). Main job after 4 minutes, label / one
  #                              digit / steady: velocity at lr 2e-3 14/69/78%, x0 at 2e-3
  #                              12/70/56%, x0 at 4e-3 28/80/73% (README, "main job")
  m.cond = "labels"            # "labels" (digit tokens), "none" (unconditional), "embeddings"
  m.num_classes = 10           # label vocabulary for cond="labels"
  m.null_label = True          # cond="labels" only: one more label token meaning "no label",
  #                              for classifier-free guidance (train.label_dropout,
  #                              sampler.guidance)
  m.label_tokens = 8           # cond="labels" only: learned tokens per label. With 1 the
  #                              cross-attention's softmax has one key, so every video token
  #                              reads the same vector (a per-label bias); with 8 each reads its
  #                              own mix. 8: the label lowers the first chunk's x0 error 2-3x as
  #                              much as with 1 after 2,000 steps (label_rates --label_use: +3.5
  #                              / +3.1 / +2.6% at t = 0.5 / 0.7 / 0.8 against +1.6 / +1.5 /
  #                              +1.0%), at the same step speed
  m.label_adaln = False        # cond="labels" only: the label token also joins the timestep
  #                              embedding, modulating every block (adaLN, as in DiT). Off:
  #                              not better here. Label recognised over seeds 0-5 (labels 8, 4,
  #                              8, 8, 7, 6), guidance 8: with it 64% (1,634 steps) and 35%
  #                              (2,000 steps, the main job), without it 50% and 43%; one digit
  #                              on screen 82% with it (2,000 steps) against 95% without
  m.text_dim = 64              # width of the conditioning tokens (Wan umT5: 4096)
  m.dtype = "float32"          # compute dtype of linear layers ("float32" or "bfloat16")
  m.hybrid = ml_collections.ConfigDict()
  m.hybrid.layers = placeholder(tuple)  # explicit hybrid
  #                              layer indices; overrides `ratio` when set
  m.hybrid.ratio = 0.75        # fraction of layers made hybrid, earliest first (authors' example)
  m.memory = ml_collections.ConfigDict()
  m.memory.read = "block"      # "block": every token of chunk n reads S_{n-1} (ARL2);
  #                              "token": ablation, token t also sees the chunk's tokens < t
  m.memory.write_during_denoising = False  # ablation: noisy passes also write the state
  m.kv_cache = ml_collections.ConfigDict()
  m.kv_cache.sink_chunks = 0   # softmax layers: first S chunks always kept (with window > 0)
  m.kv_cache.window_chunks = 0  # softmax layers: keep only the last W chunks; 0 = unbounded
  m.attention_impl = placeholder(str)  # local attention
  #                              back-end: None (auto), "xla", "reference", "pallas"
  m.memory_impl = placeholder(str)  # gated-delta back-end
  m.kernel_interpret = False   # run the Pallas kernels in interpret mode (CPU tests; slow)
  m.gdn_chunk_size = 32        # sub-chunk C of the chunked WY/UT gated delta rule; at most
  #                              the tokens per AR chunk (here 2 frames x 16 = 32), else padded
  m.remat = False              # rematerialise each block in the backward pass (saves memory)
  m.scan_layers = False        # training forward: one lax.scan per run of consecutive blocks
  #                              of one kind (hybrid, softmax) instead of unrolled blocks. One
  #                              block compiled per run, and a block's backward buffers live
  #                              inside its loop iteration (unrolled, XLA:CPU held every
  #                              layer's at once); on in the Wan configs. Off here: 4 small
  #                              blocks compile fast unrolled
  m.remat_policy = "nothing"   # with remat, what a block keeps: "nothing" (its input only;
  #                              the smallest) or "dots" (also the matmul outputs without batch
  #                              dims: less recompute, more memory); chosen by --mode=compile
  #                              (configs/arl2_wan1_3b.py at 240x416, fsdp=8, 2 -> 4 layers):
  #                              "nothing" 11.8 -> 12.4 GiB per device (+0.27 per layer),
  #                              "dots" 12.0 -> 13.8 (+0.90): "nothing" is the smaller at any
  #                              depth, "dots" does 23% fewer matmul FLOPs
  return m


def mesh_config() -> ml_collections.ConfigDict:
  """Device mesh (data, fsdp, tensor, context); -1 takes the remaining devices."""
  h = ml_collections.ConfigDict()
  h.data = -1                  # pure data parallelism
  h.fsdp = 1                   # parameters, optimizer state and EMA sharded over `embed`
  h.tensor = 1                 # heads and MLP width (Megatron-style)
  h.context = 1                # tokens of activations and K/V caches
  h.rules = ()                 # overrides of hybrid_video/sharding.DEFAULT_RULES:
  #                              ((logical, mesh axis or tuple or None), ...)
  return h


def wan1_3b_model() -> ml_collections.ConfigDict:
  """Wan2.1-T2V-1.3B shapes with ARL2's default 75% hybrid layers."""
  m = model_config()
  m.in_channels = 16
  m.out_channels = 16
  m.patch_size = (1, 2, 2)
  m.frames_per_chunk = 3
  m.dim = 1536
  m.num_layers = 30
  m.num_heads = 12
  m.mlp_dim = 8960
  m.cond = "embeddings"
  m.text_dim = 4096
  m.dtype = "bfloat16"
  m.remat = True
  m.scan_layers = True
  m.gdn_chunk_size = 64        # FLA's sub-chunk at paper scale (4680 tokens per AR chunk)
  m.prediction = "velocity"    # Wan predicts the flow velocity
  m.null_label = False
  m.label_adaln = False
  return m


def wan1_3b_sampler(s: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  s.kind = "few_step"          # the paper's Wan model is step-distilled: 4 passes + context
  s.shift = 5.0
  s.clip_x0 = False            # latents are not bounded
  s.guidance = 1.0             # the step-distilled model samples without guidance
  return s


def sampler_config() -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.kind = "euler"             # "euler" (flow ODE; for models trained by flow matching, as
  #                              here) or "few_step" (the paper's x0 prediction + re-noise,
  #                              made for a step-distilled model; with timesteps and shift 5)
  s.timesteps = (1000, 750, 500, 250)  # few_step schedule on the 0..1000 scale (paper)
  s.shift = 1.0                # timestep shift t' = s t / (1 + (s - 1) t) (paper: 5 with
  #                              few_step; 1 = uniform Euler steps)
  s.num_steps = 32             # euler: number of steps (model passes per chunk; 32: one digit
  #                              on screen in 86% of frames against 83% with 16, 64% with 8
  #                              and 94% with 64, on one 4-minute model)
  s.guidance = 4.0             # classifier-free guidance scale w: v_null + w (v - v_null) per
  #                              pass (1 = off; label models need model.null_label;
  #                              unconditional models sample unguided). 4: with 8 label tokens
  #                              the label is recognised as often as at 8 (44-45% of frames, 50
  #                              videos, two runs) and one digit is on screen in 80-81% of
  #                              frames against 59-70% at 8; with 1 label token 8 was best
  s.clip_x0 = True             # clip each denoised chunk to [-1, 1] (pixel-space models)
  s.num_frames = 64            # frames to stream in --mode=sample and by the main job (was
  #                              the --num_frames flag)
  #                              (64 = 8x the 8-frame training clips)
  s.cache_chunks = 8           # initial K/V cache slots; grows by doubling when unbounded
  s.seed = 0                   # sampling seed
  # Resumable streams (--mode=sample): <workdir>/samples/<output>.stream/ holds the stream
  # checkpoints and the video segments; rerunning the same command resumes after a kill.
  s.output = placeholder(str)  # video name in <workdir>/samples (no .mp4); None:
  #                              sample_step_<step>_<N>f (+ _seed<S> for seed S != 0), a fork:
  #                              <parent>_fork<chunk>_seed<seed>
  s.checkpoint_every = 16      # chunks between stream checkpoints (and one at the end); 0 = off
  s.keep_stream_checkpoints = 3  # stream checkpoints kept (the last K); 0 = all (each one
  #                              stays forkable)
  s.resume_chunk = placeholder(int)  # resume from this saved chunk instead of the latest;
  #                              newer checkpoints are moved to <output>.stream/discarded/
  s.fork_from = placeholder(str)  # start a new stream from another one's saved chunk: its
  #                              name in <workdir>/samples, or the path of its .mp4 or .stream
  s.fork_chunk = placeholder(int)  # the parent's saved chunk k to fork from (the fork keeps
  #                              its first k chunks and draws the rest with `seed`); None = latest
  s.use_mesh = False           # --mode=sample: shard parameters and carry over `mesh`
  #                              (False: one device)
  return s


def data_config() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.source = "moving_digits"   # "moving_digits" (embedded, generated), "video_folder", or
  #                              "latent_clips" (VAE latents written by --mode=encode)
  d.config = "slow"            # moving_digits builder config: "slow" (32x32, 8 frames, 0.5-1.25
  #                              px / frame: the main job's; at 1-2.5 px / frame ("default") the
  #                              digit's strokes change from chunk to chunk after 8 CPU minutes),
  #                              "default", "tiny", "two_digits"
  d.dir = placeholder(str)     # tfds data_dir; None = $TFDS_DATA_DIR or ~/tensorflow_datasets
  d.folder = placeholder(str)  # video_folder: folder of .mp4/.webm files
  d.num_frames = 8             # video_folder: frames per clip
  d.frame_size = (32, 32)      # video_folder: (height, width) of the clips
  d.fps = 8.0                  # video_folder: frame rate clips are resampled to
  d.channels = 1               # video_folder: 1 (grayscale) or 3 (RGB); must match the model
  d.latents = placeholder(str)  # latent_clips: the dataset directory --mode=encode printed
  #                              (num_frames and frame_size then count latents)
  return d


def train_config() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.batch_size = 8             # global batch size
  t.grad_accum_steps = 1       # micro-batches per step (gradients averaged; the batch must
  #                              divide); holds one micro-batch's activations at a time
  t.num_steps = 2000           # optimizer steps (the run also stops at max_minutes); the
  #                              cosine decay spans num_steps, so size it to the time budget
  #                              (a 2-core machine does 1,500-3,000 in 8 minutes)
  t.max_minutes = 8.0          # wall-clock bound on training, minutes; 0 = no bound (8: the
  #                              main job, install and video included, within 10 minutes)
  t.learning_rate = 4e-3       # peak AdamW learning rate (2e-3 learned more slowly)
  t.warmup_steps = 100         # linear warmup steps
  t.end_lr_factor = 0.05       # cosine decay ends at learning_rate * end_lr_factor
  t.weight_decay = 0.01        # AdamW decoupled weight decay (matrices only)
  t.grad_clip = 1.0            # global gradient-norm clip
  t.ema_decay = 0.995          # EMA of the parameters, used for sampling (warmup:
  #                              decay = min(ema_decay, (1 + step) / (10 + step)))
  t.label_dropout = 0.1        # fraction of clips trained with the null label instead of
  #                              theirs (classifier-free guidance; label models need
  #                              model.null_label; no effect without labels)
  t.model_guidance = 0.0       # w: train on the guided target eps - x0 + w sg(v(label) -
  #                              v(null)) (label models with label_dropout; one more forward
  #                              pass per step); samples like guidance 1 / (1 - w) with
  #                              sampler.guidance = 1. 0 = plain flow matching
  t.t_logit_mean = 0.8         # per-chunk noise level t = sigmoid(N(mean, std)) (logit-normal);
  t.t_logit_std = 0.8          # biased to high noise, where a chunk's layout is decided (as in
  #                              Li & He's x0 recipe; N(0, 1) was not better here)
  t.log_every = 20             # steps between metric writes
  t.checkpoint_every = 500     # steps between checkpoints (and one at the end)
  t.keep_checkpoints = 3       # checkpoints kept on disk
  t.resume_step = placeholder(int)  # restore this step instead of the latest (training), or
  #                              the checkpoint --mode=sample/eval read (was --checkpoint_step)
  t.sample_every = 0           # steps between sample videos; 0 = only the final video
  t.sample_frames = 32         # frames in the periodic sample videos
  t.final_sample = True        # stream sampler.num_frames frames after training (the main job)
  return t


def eval_config() -> ml_collections.ConfigDict:
  """--mode=eval (hybrid_video/modes/evaluate.py): long-horizon continuation of test clips."""
  e = ml_collections.ConfigDict()
  e.context_frames = 4         # k: ground-truth frames fed by context passes (whole chunks)
  e.num_frames = 80            # M: frames generated after them (80 = 10x the 8-frame clips)
  e.num_videos = 32            # test clips evaluated (the first of the test split)
  e.batch_size = 32            # clips streamed together
  e.bucket_clips = (1, 2, 4, 10)  # horizon bucket edges, in training-clip lengths
  e.search_radius = 0          # position search radius in pixels; 0 = the digit size
  e.ink_threshold = 0.25       # a crop / search area whose max is below this holds no digit
  e.psnr_cap = 100.0           # PSNR of identical frames (dB)
  e.seed = 0                   # sampling noise seed (the same for every checkpoint)
  e.num_seeds = 1              # sampling seeds per checkpoint (seed + i * 1,000,003): figures
  #                              are means over seeds with their standard deviation
  e.condition = "label"        # "label": each clip's own label; "null": the null label (models
  #                              with model.null_label), so a digit's identity must come from
  #                              the context frames (the memory task)
  e.gap_window = 8             # exits data: frames scored for identity after the digit returns
  e.workdirs = placeholder(str)  # [LABEL=]WORKDIR[+FIELD=VALUE...],... checkpoints compared
  #                              side by side (default: --workdir); was the --eval_workdirs flag
  return e


def compile_config() -> ml_collections.ConfigDict:
  a = ml_collections.ConfigDict()
  a.clip_chunks = 2            # --mode=compile: chunks per training clip
  a.cond_tokens = 16           # --mode=compile: conditioning tokens for model.cond="embeddings"
  a.sample_batch = 1           # --mode=compile: batch of the sampler step (and VAE decode)
  a.steps = ("train", "sample")  # --mode=compile: which steps, of train, stage1, stage2_tf,
  #                              stage2_rollout (need a `convert` section), sample, vae_decode
  #                              (needs configs/wan.py)
  a.vae_latents = 3            # --mode=compile vae_decode: latents per decode step
  a.device_memory_gib = 80.0   # --mode=compile: the verdict's device memory (H100/A100 80 GB)
  return a


def serve_config() -> ml_collections.ConfigDict:
  """--mode=serve (hybrid_video/modes/serve.py): a local page that streams videos as made."""
  v = ml_collections.ConfigDict()
  v.host = "127.0.0.1"         # bind address; anything but loopback lets whoever reaches it run
  #                              the model (there is no login): add the name to allowed_hosts
  v.port = 8000                # TCP port of the page
  v.allowed_hosts = ("127.0.0.1", "localhost")  # Host headers answered (DNS-rebinding guard);
  #                              () answers any
  v.max_queue = 4              # viewers that may wait behind the running generation; the next
  #                              one is told the queue is full
  v.max_frames = 128           # longest video one request may ask for, frames (each cache
  #                              capacity up to it is compiled at start-up)
  v.max_seconds = 300.0        # wall-clock bound on one generation, seconds (it stops at the
  #                              next chunk boundary after the first chunk and frees the
  #                              accelerator for the queue); 0 = none
  v.max_prompt_chars = 512     # longest prompt accepted (text-conditioned models)
  v.fps = 8.0                  # the video's frame rate: turns a length in seconds into frames,
  #                              and the saved mp4's rate (the page shows frames as they come)
  v.image_format = "jpeg"      # frames on the wire: "jpeg" (small) or "png" (lossless)
  v.jpeg_quality = 90          # JPEG quality, 1..95
  v.viewer_buffer = 8          # frames held for a viewer that reads slower than the model
  #                              makes them; the oldest are dropped, the model never waits
  v.warmup = True              # compile every cache capacity up to max_frames before serving,
  #                              so no viewer waits for the compiler
  return v


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config of variant `arg` (see module docstring)."""
  c = ml_collections.ConfigDict()
  c.seed = 0                   # model init seed
  c.model = model_config()
  c.sampler = sampler_config()
  c.mesh = mesh_config()
  c.compile = compile_config()
  c.data = data_config()
  c.train = train_config()
  c.eval = eval_config()
  c.serve = serve_config()
  c.video_fps = 8              # frame rate of written mp4 files
  c.video_upscale = 4          # nearest-neighbour upscale of written mp4 frames
  c.progress = True            # show progress bars (was the --progress flag)
  variant = arg or "arl2"
  if variant == "arl2":
    pass
  elif variant == "softmax":
    c.model.hybrid.ratio = 0.0
  elif variant == "hybrid100":
    c.model.hybrid.ratio = 1.0
  elif variant == "mixed":
    c.model.hybrid.ratio = 0.5
  elif variant == "smoke":
    c.train.num_steps = 30
    c.train.max_minutes = 1.0
    c.train.warmup_steps = 5
    c.train.batch_size = 4
    c.train.log_every = 5
    c.train.checkpoint_every = 15
    c.sampler.num_frames = 16
    c.sampler.num_steps = 4
    c.data.config = "tiny"
    c.model.dim = 48
    c.model.num_heads = 2
    c.model.mlp_dim = 96
    c.model.num_layers = 2
    c.model.patch_size = (1, 4, 4)
  elif variant == "wan1_3b":
    c.model = wan1_3b_model()
    c.sampler = wan1_3b_sampler(c.sampler)
  else:
    raise ValueError(f"unknown config variant {variant!r}; choose arl2, softmax, hybrid100, "
                     "mixed, smoke, wan1_3b")
  return c
