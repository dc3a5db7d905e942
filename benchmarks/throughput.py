"""Throughput against the release, side by side: forward (eval) and the full train step.

    python -m benchmarks.throughput --release PATH [--variants secvit_t secvit_s] [--batch 8]
        [--size 224] [--repeats 7] [--threads 2] [--json benchmarks/results/throughput.json]

PATH is a checkout of the release repository: its `classfication_release/SecViT.py` is imported
from there (benchmarks/release.py; torch and einops suffice). Without --release only this
project's side runs. `--baseline TREE` adds this project at another revision as a third side,
'baseline', for the A/B of a change (`git worktree add TREE REV`: its `secvit_jax` and
`configs` are imported from TREE, ahead of this checkout's; the harness stays this one).

Each side runs in its own worker process, started once and kept warm: 'project' (JAX) and
'release' (PyTorch). Both are pinned to the same --threads CPUs (and torch.set_num_threads) and
start with train.py's allocator settings (secvit_jax/host_memory.py: glibc's huge-page tunable
and the buffer cache preloaded; the release's step times the same with and without the cache;
SECVIT_JAX_DEFAULT_MALLOC=1 leaves both off for every side), except that
--baseline-without-buffer-cache starts the baseline without the cache, as revisions from before
it ran; with --realtime they share the same scheduling too (SCHED_RR: on a machine shared with
other work, nice does not keep the others off the CPUs when they run in other sessions, since
Linux schedules each session as a group, and a 2-thread step loses far more than its share when
one thread is descheduled).
For each variant and mode both sides build and warm up, then take turns, the side going first
alternating, --repeats times; a turn is --turn-warmup untimed calls and one timed call, and a
figure is the minimum over the repeats (the least disturbed call); all times are in the JSON.
Modes:
  forward: `model.apply(variables, images, train=False)` against the release's model in eval
    mode under torch.no_grad().
  train step: the recipe's step (`benchmarks.common.one_device_train_setup`: Mixup/CutMix,
    stochastic depth, AdamW, EMA, the state donated) against `benchmarks.release.ReleaseTrainStep`
    (the same Mixup/CutMix parameters, soft-target cross-entropy, torch AdamW, an EMA).
Float32 on the CPU. The README's throughput table is made from this script's JSON only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

MODES = ('forward', 'train step')


# ------------------------------------------------------------------------------------------------
# The two sides. Each lives in its own worker process; its methods are what the parent calls.
# ------------------------------------------------------------------------------------------------


def _environment(threads: int) -> dict[str, Any]:
  policy = os.sched_getscheduler(0)
  return {'threads': threads, 'cpus': sorted(os.sched_getaffinity(0)),
          'GLIBC_TUNABLES': os.environ.get('GLIBC_TUNABLES', ''),
          'LD_PRELOAD': os.environ.get('LD_PRELOAD', ''),
          'scheduler': {os.SCHED_RR: 'SCHED_RR', os.SCHED_FIFO: 'SCHED_FIFO'}.get(
              policy, 'SCHED_OTHER')}


class ProjectSide:
  """This project's model and train step in JAX, on JAX's default backend."""

  def __init__(self, threads: int):
    import jax  # pylint: disable=g-import-not-at-top
    self._jax = jax
    self._threads = threads
    self._call: Callable[[], Any] | None = None

  def describe(self) -> dict[str, Any]:
    from benchmarks import common  # pylint: disable=g-import-not-at-top
    import secvit_jax  # pylint: disable=g-import-not-at-top
    package = os.path.dirname(secvit_jax.__file__)
    return {'framework': f'jax {self._jax.__version__}', 'device': common.machine_description(),
            'processor': _processor_name(), 'package': package, 'revision': _revision(package),
            **_environment(self._threads)}

  def prepare(self, variant: str, mode: str, batch: int, size: int, dtype: str,
              warmup: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Builds and compiles `mode` for this variant (with `overrides` of its model fields), runs
    it `warmup` times; returns the compile time and, for the train step, the recipe's
    Mixup/CutMix settings."""
    jax = self._jax
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from benchmarks import common  # pylint: disable=g-import-not-at-top
    from secvit_jax import model as model_lib  # pylint: disable=g-import-not-at-top
    self._call = None  # Frees the previous measurement's arrays first.
    images = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
    info: dict[str, Any] = {}
    start = time.perf_counter()
    if mode == 'forward':
      model = model_lib.create_model(variant, dtype=jnp.dtype(dtype), **(overrides or {}))
      variables = jax.jit(lambda: model.init(  # 'rbg': an init program far quicker to compile.
          jax.random.key(0, impl='rbg'), images[:1], train=False))()
      forward = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
          variables, images).compile()
      self._call = lambda: forward(variables, images)
    else:
      config, setup = common.one_device_train_setup(variant, batch, size, dtype,
                                                    model_overrides=overrides)
      step = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()
      arrays = {'image': images,
                'label': jax.random.randint(jax.random.key(1), (batch,), 0, 1000)}
      state = [setup.init_state()]

      def train_step():  # The step donates its state: each call takes the one returned before.
        state[0], metrics = step(state[0], arrays)
        return metrics
      self._call = train_step
      mixing = config.mixup
      info['mixing'] = {'num_classes': 1000, 'mixup_alpha': mixing.mixup_alpha,
                        'cutmix_alpha': mixing.cutmix_alpha, 'switch_prob': mixing.switch_prob,
                        'label_smoothing': mixing.label_smoothing}
    info['compile_s'] = time.perf_counter() - start
    for _ in range(warmup):
      jax.block_until_ready(self._call())
    return info

  def time_call(self) -> float:
    start = time.perf_counter()
    self._jax.block_until_ready(self._call())
    return time.perf_counter() - start

  def peak_memory_bytes(self) -> int | None:
    """The device allocator's peak since the process started (None where it keeps no stats)."""
    stats = self._jax.devices()[0].memory_stats() or {}
    return stats.get('peak_bytes_in_use')


class ReleaseSide:
  """The release's PyTorch model (imported from a checkout) and its recipe's train step."""

  def __init__(self, threads: int, checkout: str, device: str = 'cpu',
               amp_dtype: str | None = None):
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import release  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    if device == 'cuda':
      torch.backends.cudnn.benchmark = True  # As the release's main.py.
    release.import_release_model(checkout)  # Fails early, naming what is missing.
    self._torch = torch
    self._release = release
    self._threads = threads
    self._checkout = checkout
    self._device = torch.device(device)
    self._amp_dtype = getattr(torch, amp_dtype) if amp_dtype else None
    self._call: Callable[[], Any] | None = None

  def describe(self) -> dict[str, Any]:
    torch = self._torch
    device = (torch.cuda.get_device_name(self._device) if self._device.type == 'cuda'
              else 'cpu')
    return {'framework': f'torch {torch.__version__}', 'device': device,
            'torch_threads': torch.get_num_threads(),
            'amp_dtype': str(self._amp_dtype) if self._amp_dtype else None,
            **_environment(self._threads)}

  def prepare(self, variant: str, mode: str, batch: int, size: int, mixing: dict[str, Any],
              warmup: int) -> dict[str, Any]:
    torch = self._torch
    self._call = None
    start = time.perf_counter()
    model = self._release.create_release_model(self._checkout, variant).to(self._device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator).to(self._device)
    autocast = lambda: torch.autocast(self._device.type, dtype=self._amp_dtype,
                                      enabled=self._amp_dtype is not None)
    if mode == 'forward':
      model.eval()

      def forward():
        with torch.no_grad(), autocast():
          return model(images)
      self._call = forward
    else:
      labels = torch.randint(0, 1000, (batch,), generator=generator).to(self._device)
      step = self._release.ReleaseTrainStep(model, batch_size=batch, mixing=mixing,
                                            amp_dtype=self._amp_dtype)
      self._call = lambda: step(images, labels)
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
      self._call()
    self._synchronize()
    return {'compile_s': compile_s}

  def _synchronize(self) -> None:
    if self._device.type == 'cuda':
      self._torch.cuda.synchronize(self._device)

  def time_call(self) -> float:
    self._synchronize()
    start = time.perf_counter()
    self._call()
    self._synchronize()
    return time.perf_counter() - start

  def peak_memory_bytes(self) -> int | None:
    if self._device.type != 'cuda':
      return None
    return int(self._torch.cuda.max_memory_allocated(self._device))


def _revision(path: str) -> str | None:
  """The git commit of the tree holding `path` (short hash, '+changes' when its secvit_jax/ has
  uncommitted changes), or None outside a git checkout."""
  def git(*args: str) -> str:
    return subprocess.run(['git', '-C', path, *args], capture_output=True, text=True,
                          check=True).stdout.strip()
  try:
    commit = git('rev-parse', '--short', 'HEAD')
    return commit + ('+changes' if git('status', '--porcelain', '--', '.') else '')
  except (OSError, subprocess.CalledProcessError):
    return None


def _processor_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


SIDES = {'project': ProjectSide, 'baseline': ProjectSide, 'release': ReleaseSide}


def _pin_threads(threads: int) -> None:
  """Restricts this process to the first `threads` CPUs it may use (XLA sizes its thread pool by
  the CPUs it may run on; torch is told as well), before either framework starts."""
  allowed = sorted(os.sched_getaffinity(0))
  if threads > len(allowed):
    raise ValueError(f'--threads {threads}: this process may run on only {len(allowed)} CPUs')
  os.sched_setaffinity(0, allowed[:threads])
  for name in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ[name] = str(threads)


def _realtime() -> None:
  """Puts this process (and the threads it starts later) under SCHED_RR, priority 1."""
  try:
    os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
  except PermissionError:
    raise PermissionError('--realtime needs root or CAP_SYS_NICE (SCHED_RR)') from None


def _worker_main(side: str, options: dict[str, Any], connection) -> None:
  """Serves (method, args) requests on `connection` until it gets None or the parent leaves."""
  try:
    os.environ.update(options.pop('env', None) or {})  # Before any framework reads it.
    tree = options.pop('tree', None)
    if tree:  # Another revision's secvit_jax and configs, imported before any of this one's.
      sys.path.insert(0, os.path.abspath(tree))
    _pin_threads(options['threads'])
    if options.pop('realtime', False):
      _realtime()
    from secvit_jax import quiet  # pylint: disable=g-import-not-at-top
    quiet.silence_startup_noise()  # Before JAX starts and TensorFlow loads.
    runner = SIDES[side](**options)
    connection.send((True, None))
  except Exception:  # pylint: disable=broad-except
    connection.send((False, traceback.format_exc()))
    return
  while True:
    try:
      request = connection.recv()
    except EOFError:
      return
    if request is None:
      return
    method, args = request
    try:
      connection.send((True, getattr(runner, method)(*args)))
    except Exception:  # pylint: disable=broad-except
      connection.send((False, traceback.format_exc()))


class Worker:
  """One side in a warm worker process (multiprocessing 'spawn': a fresh interpreter that
  inherits this process's environment, GLIBC_TUNABLES and LD_PRELOAD included, with
  `launch_environment` over it: what the dynamic loader must see at exec)."""

  def __init__(self, side: str, label: str | None = None,
               launch_environment: dict[str, str] | None = None, **options: Any):
    self.side = label or side  # How messages name it.
    context = multiprocessing.get_context('spawn')
    self._connection, child = context.Pipe()
    self._process = context.Process(target=_worker_main, args=(side, options, child),
                                    name=f'{side}-worker', daemon=True)
    launch_environment = launch_environment or {}
    saved = {name: os.environ.get(name) for name in launch_environment}
    os.environ.update(launch_environment)
    try:
      self._process.start()
    finally:
      for name, value in saved.items():
        if value is None:
          del os.environ[name]
        else:
          os.environ[name] = value
    child.close()
    self._receive('start')

  def _receive(self, what: str) -> Any:
    try:
      ok, value = self._connection.recv()
    except EOFError:
      self._process.join(5)
      raise RuntimeError(f'the {self.side} worker died during {what} (exit code '
                         f'{self._process.exitcode}; out of memory?)') from None
    if not ok:
      raise RuntimeError(f'the {self.side} worker failed in {what}:\n{value}')
    return value

  def call(self, method: str, *args: Any) -> Any:
    self.start(method, *args)
    return self._receive(method)

  def start(self, method: str, *args: Any) -> None:
    """Sends a request without waiting; `finish(method)` returns its answer (so that several
    workers can work at once, e.g. compile)."""
    self._connection.send((method, args))

  def finish(self, method: str) -> Any:
    return self._receive(method)

  def close(self) -> None:
    if self._process.is_alive():
      try:
        self._connection.send(None)
      except (BrokenPipeError, OSError):
        pass
      self._process.join(30)
    if self._process.is_alive():
      self._process.terminate()
      self._process.join()


def alternate(workers: dict[str, Worker], repeats: int, turn_warmup: int) -> dict[str, list[float]]:
  """`repeats` rounds of one turn per side, the side going first alternating per round. A turn
  is `turn_warmup` untimed calls, then one timed call: the first call after the other side ran
  pays for what the other side did to the machine's state (caches, freed and re-zeroed pages:
  XLA maps its temporaries afresh per call, 1.3 GiB for secvit_t at batch 8), which a training
  loop, calling back to back, does not."""
  names = list(workers)
  times = {name: [] for name in names}
  for index in range(repeats):
    for name in (names if index % 2 == 0 else names[::-1]):
      for _ in range(turn_warmup):
        workers[name].call('time_call')
      times[name].append(workers[name].call('time_call'))
  return times


def side_summary(batch: int, times: list[float], prepared: dict[str, Any]) -> dict[str, Any]:
  best = min(times)
  return {'min_s': best, 'images_per_s': batch / best, 'times_s': times,
          'compile_s': prepared['compile_s']}


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--release', metavar='PATH',
                      help='a checkout of the release repository, to run its model side by side')
  parser.add_argument('--baseline', metavar='TREE',
                      help='a worktree of this project at another revision (git worktree add '
                      'TREE REV), run as a third side to A/B a change')
  parser.add_argument('--baseline-without-buffer-cache', action='store_true',
                      help='start the baseline side without the buffer cache '
                      '(secvit_jax/host_memory.py), as revisions from before it ran')
  parser.add_argument('--variants', nargs='+', default=['secvit_t', 'secvit_s'],
                      choices=['secvit_t', 'secvit_s', 'secvit_b', 'secvit_l'],
                      help='the variants to time (default: secvit_t secvit_s)')
  parser.add_argument('--modes', nargs='+', default=list(MODES), choices=MODES,
                      help='forward (eval), train step (the recipe\'s), or both (default)')
  parser.add_argument('--batch', type=int, default=8, help='images per call (default: 8)')
  parser.add_argument('--size', type=int, default=224,
                      help='image height and width (default: 224)')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                      help="this project's compute dtype (the release runs float32)")
  parser.add_argument('--model-overrides', type=json.loads, default={}, metavar='JSON',
                      help="fields of this project's model, e.g. '{\"dwconv_impl\": \"shift\"}' "
                      '(the release side keeps its model: say so when comparing)')
  parser.add_argument('--repeats', type=int, default=7, help='timed turns per side (minimum)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed calls per side first')
  parser.add_argument('--threads', type=int, default=2, help='CPUs (and threads) per side')
  parser.add_argument('--turn-warmup', type=int, default=1,
                      help='untimed calls at the start of each turn')
  parser.add_argument('--realtime', action='store_true',
                      help='run both workers under SCHED_RR (needs root): on a shared machine '
                      'other processes then cannot interrupt a timed call (the kernel still keeps '
                      '5%% of each second for them), where nice alone does not hold them off')
  parser.add_argument('--json', metavar='PATH', help='also write the results as JSON here')
  args = parser.parse_args(argv)
  if args.release and args.dtype != 'float32':
    parser.error('side by side with --release compares float32 only (the release runs float32 '
                 'on the CPU); drop --dtype or --release')
  if args.release and not os.path.isdir(args.release):
    parser.error(f'--release {args.release}: no such directory')
  if args.baseline and not os.path.isdir(os.path.join(args.baseline, 'secvit_jax')):
    parser.error(f'--baseline {args.baseline}: not a tree of this project (no secvit_jax/ in it)')
  if args.repeats < 1:
    parser.error('--repeats must be at least 1')
  return args


def table(results: list[dict[str, Any]]) -> str:
  """The Markdown table of a run: img/s per side and the project's ratio to each other side."""
  others = [side for side in ('baseline', 'release') if any(side in r for r in results)]
  headers = ['variant', 'mode', 'batch', 'size', 'dtype', 'project img/s']
  for side in others:
    headers += [f'{side} img/s', f'project / {side}']
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
  for r in results:
    cells = [r['variant'], r['mode'], r['batch'], r['size'], r['dtype'],
             f"{r['project']['images_per_s']:.2f}"]
    for side in others:
      cells += ([f"{r[side]['images_per_s']:.2f}", f"**{r['ratio_' + side]:.2f}×**"]
                if side in r else ['-', '-'])
    lines.append('| ' + ' | '.join(str(cell) for cell in cells) + ' |')
  return '\n'.join(lines)


def _without_buffer_cache() -> dict[str, str]:
  """LD_PRELOAD without host_memory's buffer cache."""
  from secvit_jax import host_memory  # pylint: disable=g-import-not-at-top
  kept = [path for path in host_memory.preloaded_paths(os.environ.get('LD_PRELOAD', ''))
          if not host_memory.is_buffer_cache(path)]
  return {'LD_PRELOAD': ' '.join(kept)}


def main(argv=None) -> None:
  args = parse_args(argv)
  command = 'python -m benchmarks.throughput ' + ' '.join(sys.argv[1:] if argv is None else argv)
  workers: dict[str, Worker] = {}
  try:
    common_options = {'threads': args.threads, 'realtime': args.realtime}
    workers['project'] = Worker('project', **common_options)
    if args.baseline:
      workers['baseline'] = Worker('baseline', tree=args.baseline,
                                   launch_environment=_without_buffer_cache()
                                   if args.baseline_without_buffer_cache else None,
                                   **common_options)
    if args.release:
      workers['release'] = Worker('release', checkout=args.release, **common_options)
    sides = {name: worker.call('describe') for name, worker in workers.items()}
    for name, description in sides.items():
      print(f'{name}: {description}', flush=True)
    results = []
    for variant in args.variants:
      for mode in args.modes:
        prepared = {'project': workers['project'].call(
            'prepare', variant, mode, args.batch, args.size, args.dtype, args.warmup,
            args.model_overrides)}
        if args.baseline:
          prepared['baseline'] = workers['baseline'].call(
              'prepare', variant, mode, args.batch, args.size, args.dtype, args.warmup,
              args.model_overrides)
        if args.release:
          # The release's train step mixes with the recipe's own Mixup/CutMix settings.
          mixing = prepared['project'].get('mixing')
          prepared['release'] = workers['release'].call(
              'prepare', variant, mode, args.batch, args.size, mixing, args.warmup)
        times = alternate(workers, args.repeats, args.turn_warmup)
        entry = {'variant': variant, 'mode': mode, 'batch': args.batch, 'size': args.size,
                 'dtype': args.dtype, 'model_overrides': args.model_overrides}
        for name in workers:
          entry[name] = side_summary(args.batch, times[name], prepared[name])
        for other in ('baseline', 'release'):
          if other in workers:
            entry[f'ratio_{other}'] = (entry['project']['images_per_s'] /
                                       entry[other]['images_per_s'])
        results.append(entry)
        print(f'{variant} {mode}: ' + ', '.join(
            f"{name} {entry[name]['images_per_s']:.2f} img/s" for name in workers) + ''.join(
                f", project / {other} {entry['ratio_' + other]:.2f}"
                for other in ('baseline', 'release') if other in workers), flush=True)
  finally:
    for worker in workers.values():
      worker.close()
  print(table(results))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump({'command': command, 'machine': sides['project']['device'],
                 'processor': sides['project']['processor'], 'repeats': args.repeats,
                 'sides': sides, 'results': results}, f, indent=2)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  from secvit_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.reexec_with_memory_settings()  # The workers inherit the settings.
  main()
