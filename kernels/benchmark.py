r"""Kernel benchmark at ARL2 paper shapes, on whatever device jax sees.

    python -m kernels.benchmark                 # GPU/TPU: full table, JSON to --json
    python -m kernels.benchmark --quick         # CPU: the XLA chunked GDN vs the scan oracle
    python -m kernels.benchmark --interpret     # CPU: also time the Pallas kernels, interpreted

Shapes: H = 12 heads, D = K = V = 128, L = 1560 (one latent frame) and 4680 (a 3-frame AR
chunk) tokens, bf16 inputs on accelerators (fp32 on CPU), fp32 GDN state. Each row is the
median of 20 timed runs (5 on CPU without --quick) after a compile and warm-up runs, with
TFLOP/s from the matmul FLOPs of the op (attention fwd 4 T^2 D per head; fwd + bwd counted as
3.5x fwd, the FlashAttention convention; GDN from `pallas_gated_delta.gdn_flops`).

Compared in one run:
- attention: the Pallas kernel, jax.nn.dot_product_attention (implementation="cudnn" on GPU,
  "xla" elsewhere) and the XLA path, for chunk-local attention (fwd, and fwd + bwd at 4680)
  and cached attention (one chunk against a 3-chunk cache);
- GDN: the Pallas kernels and the XLA chunked path for the ARL2 memory (R = L readers) and the
  per-token gated delta rule; FLA's chunk_gated_delta_rule on the same shapes when torch,
  triton and fla import next to a GPU; on CPU the token-by-token scan oracle instead, with
  the chunked/scan speed ratio.

The whole GPU run, compiles included, stays under --budget seconds (default 270): rows that
would start past it are reported as skipped.
"""

import argparse
import json
import platform as platform_lib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels.gated_delta import xla as gdn_xla
from kernels.gated_delta import pallas_gated_delta
from kernels.gated_delta import reference as gdn_reference
from kernels.local_attention import pallas_attention
from kernels.local_attention import xla as attention_xla

HEADS, HEAD_DIM = 12, 128
CHUNK_LENS = (1560, 4680)
GDN_CHUNK = 64


def _time(fn, args, repeats, warmup):
  """Median seconds of fn(*args) over `repeats` runs after compile + `warmup` runs."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), compile_s


class Bench:
  """Collects rows; skips rows once the time budget is spent."""

  def __init__(self, repeats, warmup, budget_s):
    self.repeats, self.warmup, self.budget_s = repeats, warmup, budget_s
    self.start = time.perf_counter()
    self.rows = []

  def run(self, op, impl, shape, flops, fn, args, repeats=None, timer=None):
    row = dict(op=op, impl=impl, shape=shape, ms=None, tflops=None, compile_s=None, note='')
    if time.perf_counter() - self.start > self.budget_s:
      row['note'] = 'skipped: time budget spent'
    else:
      try:
        timer = timer or _time
        median_s, compile_s = timer(fn, args, repeats or self.repeats, self.warmup)
        row.update(ms=median_s * 1e3, tflops=flops / median_s / 1e12, compile_s=compile_s)
      except Exception as e:  # pylint: disable=broad-except
        row['note'] = f'failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}'
    self.rows.append(row)
    print(_format_row(row), flush=True)
    return row


def _format_row(row):
  ms = '-' if row['ms'] is None else f"{row['ms']:10.3f}"
  tf = '-' if row['tflops'] is None else f"{row['tflops']:8.3f}"
  cs = '-' if row['compile_s'] is None else f"{row['compile_s']:6.1f}"
  return f"{row['op']:<26} {row['impl']:<22} {row['shape']:<24} {ms:>10} {tf:>8} {cs:>7}  {row['note']}"


HEADER = (f"{'op':<26} {'impl':<22} {'shape':<24} {'ms':>10} {'TFLOP/s':>8} {'comp_s':>7}"
          '  note')


def _normal(key, shape, dtype):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def bench_attention(bench, dtype, on_gpu, pallas_kw, lens):
  key = jax.random.key(0)
  for chunk_len in lens:
    shape = (1, chunk_len, HEADS, HEAD_DIM)
    q, k, v = (_normal(jax.random.fold_in(key, i), shape, dtype) for i in range(3))
    flops = pallas_attention.attention_flops(1, HEADS, chunk_len, chunk_len, HEAD_DIM)
    label = f'L={chunk_len}'
    local = lambda f: jax.jit(lambda q, k, v: f(q[:, None], k[:, None], v[:, None])[:, 0])
    if pallas_kw is not None:
      bench.run('chunk_local fwd', 'pallas', label, flops,
                local(lambda q, k, v: pallas_attention.chunk_local_attention(
                    q, k, v, **pallas_kw)), (q, k, v))
    bench.run('chunk_local fwd', 'xla (jnp)', label, flops,
              local(attention_xla.chunk_local_attention), (q, k, v))
    dpa_impl = 'cudnn' if on_gpu else 'xla'
    bench.run('chunk_local fwd', f'dot_product_attn[{dpa_impl}]', label, flops,
              jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                  q, k, v, implementation=dpa_impl)), (q, k, v))

    if chunk_len == lens[-1]:
      def fwd_bwd(f):
        loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      if pallas_kw is not None:
        bench.run('chunk_local fwd+bwd', 'pallas (jnp bwd)', label, 3.5 * flops,
                  fwd_bwd(lambda q, k, v: pallas_attention.chunk_local_attention(
                      q[:, None], k[:, None], v[:, None], **pallas_kw)), (q, k, v))
      bench.run('chunk_local fwd+bwd', 'xla (jnp)', label, 3.5 * flops,
                fwd_bwd(lambda q, k, v: attention_xla.chunk_local_attention(
                    q[:, None], k[:, None], v[:, None])), (q, k, v))
      bench.run('chunk_local fwd+bwd', f'dot_product_attn[{dpa_impl}]', label, 3.5 * flops,
                fwd_bwd(lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, implementation=dpa_impl)), (q, k, v))

      # One chunk against a cache of 3 chunks (all valid): the softmax-layer sampling step.
      cache_len = 3 * chunk_len
      cache_shape = (1, cache_len, HEADS, HEAD_DIM)
      k_cache, v_cache = (_normal(jax.random.fold_in(key, 10 + i), cache_shape, dtype)
                          for i in range(2))
      valid = jnp.ones((cache_len,), bool)
      flops = pallas_attention.attention_flops(1, HEADS, chunk_len, cache_len + chunk_len,
                                               HEAD_DIM)
      label = f'L={chunk_len} M={cache_len}'
      args = (q, k, v, k_cache, v_cache, valid)
      if pallas_kw is not None:
        bench.run('cached fwd', 'pallas', label, flops,
                  jax.jit(lambda *a: pallas_attention.cached_chunk_attention(*a, **pallas_kw)),
                  args)
      bench.run('cached fwd', 'xla (jnp)', label, flops,
                jax.jit(attention_xla.cached_chunk_attention), args)
      bench.run('cached fwd', f'dot_product_attn[{dpa_impl}]', label, flops,
                jax.jit(lambda q, k, v, kc, vc, m: jax.nn.dot_product_attention(
                    q, jnp.concatenate([kc, k], 1), jnp.concatenate([vc, v], 1),
                    implementation=dpa_impl)), args)


def _gdn_inputs(key, lead, reads, dtype):
  """l2-normalised q, k; v; g = -softplus (moderate decay); beta in (0, 2); h0."""
  ks = jax.random.split(key, 6)
  def unit(k, shape):
    x = jax.random.normal(k, shape, jnp.float32)
    return (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)
  q_shape = (*lead[:-1], reads, HEADS, HEAD_DIM) if reads else (*lead, HEADS, HEAD_DIM)
  q = unit(ks[0], q_shape)
  k = unit(ks[1], (*lead, HEADS, HEAD_DIM))
  v = _normal(ks[2], (*lead, HEADS, HEAD_DIM), dtype)
  g = -jax.nn.softplus(jax.random.uniform(ks[3], (*lead, HEADS), minval=-5.0, maxval=0.0))
  beta = 2 * jax.nn.sigmoid(jax.random.normal(ks[4], (*lead, HEADS)))
  h0 = jax.random.normal(ks[5], (lead[0], HEADS, HEAD_DIM, HEAD_DIM), jnp.float32)
  return q, k, v, g, beta, h0


def bench_gdn(bench, dtype, pallas_kw, lens, with_scan, scan_repeats):
  key = jax.random.key(1)
  ratios = {}
  for chunk_len in lens:
    label = f'N=1 L=R={chunk_len}'
    q, k, v, g, beta, h0 = _gdn_inputs(key, (1, 1, chunk_len), chunk_len, dtype)
    flops = pallas_gated_delta.gdn_flops(1, HEADS, chunk_len, HEAD_DIM, HEAD_DIM, GDN_CHUNK,
                                         num_reads=chunk_len)
    args = (q, k, v, g, beta, h0)
    if pallas_kw is not None:
      bench.run('arl2_memory fwd', 'pallas', label, flops,
                jax.jit(lambda q, k, v, g, b, h: pallas_gated_delta.arl2_memory(
                    q, k, v, g, b, initial_state=h, chunk_size=GDN_CHUNK, **pallas_kw)), args)
    xla_row = bench.run('arl2_memory fwd', 'xla chunked', label, flops,
                        jax.jit(lambda q, k, v, g, b, h: gdn_xla.chunk_arl2_memory(
                            q, k, v, g, b, initial_state=h, chunk_size=GDN_CHUNK)), args)
    if with_scan and chunk_len == lens[-1]:
      scan_row = bench.run('arl2_memory fwd', 'scan oracle (reference)', label, flops,
                           jax.jit(lambda q, k, v, g, b, h: gdn_reference.arl2_memory_reference(
                               q, k, v, g, b, initial_state=h)), args, repeats=scan_repeats)
      if xla_row['ms'] and scan_row['ms']:
        ratios[label] = scan_row['ms'] / xla_row['ms']

  # Per-token outputs (the form FLA computes), one 3-frame chunk.
  chunk_len = lens[-1]
  label = f'T={chunk_len}'
  q, k, v, g, beta, h0 = _gdn_inputs(jax.random.fold_in(key, 1), (1, chunk_len), None, dtype)
  flops = pallas_gated_delta.gdn_flops(1, HEADS, chunk_len, HEAD_DIM, HEAD_DIM, GDN_CHUNK)
  flops += 1 * HEADS * (-(-chunk_len // GDN_CHUNK)) * (2 * GDN_CHUNK * GDN_CHUNK * HEAD_DIM * 2)
  args = (q, k, v, g, beta, h0)
  if pallas_kw is not None:
    bench.run('gated_delta_rule fwd', 'pallas', label, flops,
              jax.jit(lambda q, k, v, g, b, h: pallas_gated_delta.gated_delta_rule(
                  q, k, v, g, b, initial_state=h, chunk_size=GDN_CHUNK, **pallas_kw)), args)
  xla_row = bench.run('gated_delta_rule fwd', 'xla chunked', label, flops,
                      jax.jit(lambda q, k, v, g, b, h: gdn_xla.chunk_gated_delta_rule(
                          q, k, v, g, b, initial_state=h, chunk_size=GDN_CHUNK)), args)
  if with_scan:
    scan_row = bench.run('gated_delta_rule fwd', 'scan oracle (reference)', label, flops,
                         jax.jit(lambda q, k, v, g, b, h:
                                 gdn_reference.naive_recurrent_gated_delta_rule(
                                     q, k, v, g, b, initial_state=h)), args,
                         repeats=scan_repeats)
    if xla_row['ms'] and scan_row['ms']:
      ratios[label] = scan_row['ms'] / xla_row['ms']
  return ratios, (q, k, v, g, beta, h0, flops, label)


def bench_fla(bench, inputs):
  """FLA's chunk_gated_delta_rule on the same per-token problem (guarded import)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import triton  # pylint: disable=g-import-not-at-top,unused-import
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    return f'FLA not run: {type(e).__name__}: {e}'
  if not torch.cuda.is_available():
    return 'FLA not run: torch sees no CUDA device'
  q, k, v, g, beta, h0, flops, label = inputs
  as_torch = lambda x, dt: torch.from_numpy(np.asarray(x, np.float32)).to('cuda', dt)
  tq, tk, tv = (as_torch(x, torch.bfloat16) for x in (q, k, v))
  tg, tbeta, th0 = (as_torch(x, torch.float32) for x in (g, beta, h0))

  def call():
    return chunk_gated_delta_rule(q=tq, k=tk, v=tv, g=tg, beta=tbeta, scale=HEAD_DIM**-0.5,
                                  initial_state=th0, output_final_state=True)

  def timer(fn, args, repeats, warmup):
    del fn, args
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
      call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
      begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      begin.record()
      call()
      end.record()
      torch.cuda.synchronize()
      times.append(begin.elapsed_time(end) / 1e3)
    return statistics.median(times), compile_s

  bench.run('gated_delta_rule fwd', 'fla chunk (torch)', label, flops, None, (), timer=timer)
  return None


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true',
                      help='only the 4680-token rows; on CPU only the GDN rows')
  parser.add_argument('--interpret', action='store_true',
                      help='on CPU, also time the Pallas kernels in interpret mode (slow)')
  parser.add_argument('--repeats', type=int, default=None,
                      help='timed runs per row (default 20; 5 on CPU without --quick)')
  parser.add_argument('--json', default='kernel_benchmark.json',
                      help='where to write the results (always on GPU/TPU; on CPU only if '
                           'given explicitly)')
  parser.add_argument('--budget', type=float, default=270.0,
                      help='seconds after which remaining rows are skipped')
  args = parser.parse_args(argv)

  device = jax.local_devices()[0]
  platform = 'gpu' if device.platform in ('gpu', 'cuda', 'rocm') else device.platform
  accelerator = platform in ('gpu', 'tpu')
  dtype = jnp.bfloat16 if accelerator else jnp.float32
  if accelerator:
    pallas_kw = {}
  elif args.interpret:
    pallas_kw = dict(interpret=True)
  else:
    pallas_kw = None
  # CPU without --quick also times attention at 4680 tokens (seconds per call): fewer runs.
  repeats = args.repeats or (20 if (accelerator or args.quick) else 5)
  lens = CHUNK_LENS[-1:] if args.quick else CHUNK_LENS
  bench = Bench(repeats=repeats, warmup=1 if not accelerator else 3, budget_s=args.budget)

  print(f'device: {device.device_kind} ({platform}); jax {jax.__version__}; dtype '
        f'{jnp.dtype(dtype).name}; median of {repeats} runs; H={HEADS} D={HEAD_DIM}')
  if pallas_kw is None:
    print('Pallas rows skipped on CPU (pass --interpret to time them in interpret mode)')
  print(HEADER)
  if not (args.quick and not accelerator):
    bench_attention(bench, dtype, platform == 'gpu', pallas_kw, lens)
  ratios, per_token = bench_gdn(bench, dtype, pallas_kw, lens, with_scan=not accelerator,
                                scan_repeats=repeats)
  fla_note = bench_fla(bench, per_token) if platform == 'gpu' else None
  if fla_note:
    print(fla_note)
  for label, ratio in ratios.items():
    print(f'GDN XLA chunked vs scan oracle at {label}: {ratio:.1f}x faster (target >= 20x)')
  total = time.perf_counter() - bench.start
  print(f'total wall time {total:.1f} s')

  explicit_json = any(a == '--json' or a.startswith('--json=') for a in (argv or sys.argv[1:]))
  if accelerator or explicit_json:
    result = dict(device=device.device_kind, platform=platform, jax=jax.__version__,
                  python=platform_lib.python_version(), dtype=jnp.dtype(dtype).name,
                  repeats=repeats, rows=bench.rows, scan_ratios=ratios, fla_note=fla_note,
                  total_s=total)
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
