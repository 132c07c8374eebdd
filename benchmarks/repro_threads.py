"""Which settings change a training run's weights: one short run of the built-in recipe, its weights' hash.

Run it several times with different ``--threads`` or environments (``OMP_WAIT_POLICY``, ``ATEN_CPU_CAPABILITY``,
a competing process) and compare the printed hashes; equal hashes mean bit-identical weights.
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile

import torch
from safetensors.torch import load_file

from hydravit.training.recipe import load_train_config
from hydravit.training.trainer import train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--threads', type=int, required=True)
    p.add_argument('--samples', type=int, default=2048)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_train_config(None, epochs=1, max_train_samples=args.samples, max_val_samples=500,
                                warmup_epochs=0.1, output=out, experiment='run', report=False, threads=args.threads)
        result = train(cfg)
        state = load_file(f'{out}/run/last.safetensors')
    digest = hashlib.sha256(b''.join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()[:16]
    print('threads', args.threads, 'cpu', torch.backends.cpu.get_cpu_capability(), 'weights', digest,
          'top1', [round(r['top1'], 1) for r in result.results])


if __name__ == '__main__':
    main()
