"""Per-step cost of the non-finite guard: the trainer's real step with the check vs the same step without it.

Builds the trainer of the README's main job (the built-in recipe: ``hydravit_fmnist_patch7_28``, batch 128,
sandwich sampler = 3 subnetworks per step, fused AdamW) on random 28x28 images and times
``Trainer.train_update`` with the guard on (loss check plus the gradient check between backward and the
optimizer step) and off (no check at all), in interleaved rounds of ``--steps`` steps each; prints the median
time per step of each and their ratio, and the gradient check timed by itself (on the gradients of a backward
at the largest k) as a share of a step: on a loaded machine the step-to-step noise hides a 1 % difference,
the isolated check does not.

    python benchmarks/bench_nonfinite_guard.py --rounds 7 --steps 6 --threads 1     # ~1.5 min on 1 core
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time

import torch

from hydravit.training.distributed import DistEnv
from hydravit.training.recipe import load_train_config
from hydravit.training.trainer import Trainer


class _Images(torch.utils.data.TensorDataset):
    num_classes = 10


def _set_guard(trainer: Trainer, on: bool) -> None:
    """On: the trainer as built. Off: neither the per-loss check nor the gradient check runs."""
    trainer.loss_scaler.before_step = trainer._gradients_finite if on else None
    trainer.guard.record_loss = (type(trainer.guard).record_loss.__get__(trainer.guard) if on  # type: ignore
                                 else lambda loss, k: None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--steps', type=int, default=6, help='optimizer steps per setting per round')
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--clip-grad', type=float, default=None, help='also clip gradients (the norm the guard could reuse)')
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    batch = 128
    data = _Images(torch.randn(batch * 4, 1, 28, 28, generator=g), torch.randint(0, 10, (batch * 4,), generator=g))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_train_config(None, output=tmp, experiment='guard', threads=args.threads, clip_grad=args.clip_grad,
                                report=False)
        trainer = Trainer(cfg, DistEnv(), datasets=(data, data))
        trainer.model.train()
        windows = [[(data.tensors[0][i * batch:(i + 1) * batch], data.tensors[1][i * batch:(i + 1) * batch])]
                   for i in range(4)]
        step = 0

        def run(on: bool) -> float:
            nonlocal step
            _set_guard(trainer, on)
            tic = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_update(windows[step % 4], step % trainer.batches_per_epoch)
                step += 1
            return (time.perf_counter() - tic) / args.steps

        def check_alone(repeats: int = 20) -> float:
            """The guard's gradient check by itself, on the gradients of one backward at the largest k."""
            _set_guard(trainer, True)
            trainer.optimizer.zero_grad(set_to_none=True)
            images, target = windows[0][0]
            trainer.criterion(trainer.model(images, k=trainer.model.k_choices[-1]), target).backward()
            calls = []
            for _ in range(repeats):
                tic = time.perf_counter()
                trainer._gradients_finite()
                calls.append(time.perf_counter() - tic)
            trainer.optimizer.zero_grad(set_to_none=True)
            return statistics.median(calls)

        run(True), run(False), check_alone()  # warm-up: optimizer state, allocator
        times: dict = {'on': [], 'off': [], 'check': []}
        for r in range(args.rounds):
            for name in (('on', 'off') if r % 2 == 0 else ('off', 'on')):
                times[name].append(run(name == 'on'))
            times['check'].append(check_alone())
    on, off = statistics.median(times['on']), statistics.median(times['off'])
    ratios = [a / b for a, b in zip(times['on'], times['off'], strict=True)]
    print(f'{cfg.model}, batch {batch}, sampler {cfg.sampler} ({cfg.num_random} random), opt {cfg.opt} (fused), '
          f'clip_grad {args.clip_grad}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds of '
          f'{args.steps} steps; load average {os.getloadavg()}')
    print(f'guard on : {1e3 * on:.1f} ms/step (median; rounds {", ".join(f"{1e3 * t:.1f}" for t in times["on"])})')
    print(f'guard off: {1e3 * off:.1f} ms/step (median; rounds {", ".join(f"{1e3 * t:.1f}" for t in times["off"])})')
    print(f'on/off: {on / off:.4f} (ratio of medians); per-round ratios median {statistics.median(ratios):.4f}, '
          f'min {min(ratios):.4f}, max {max(ratios):.4f}')
    check = statistics.median(times['check'])
    print(f'the gradient check alone: {1e3 * check:.3f} ms per step (median of {args.rounds} rounds of 20 calls) '
          f'= {100 * check / off:.2f} % of a step without it')


if __name__ == '__main__':
    main()
