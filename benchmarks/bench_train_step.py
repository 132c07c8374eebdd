"""Training-step speed of the sliced universal model vs a standalone timm ViT of the same shape.

Per k: images/s of one step (forward + cross-entropy + backward + AdamW step) of ``model(x, k=k)``
divided by that of the extracted timm ``VisionTransformer``, both measured in this run with
interleaved rounds, medians (target: >= 0.90). The sliced model's AdamW step updates its full
tensors (the paper's behaviour: moments and weight decay also move the inactive tail), which is the
main cost the standalone model does not pay at small k.

With ``--active-slice`` a third model is timed in the same rounds: the sliced model stepped by
``ActiveSliceAdamW`` (``hydravit train --opt-active-slice``), which updates only the active slice.

    python benchmarks/bench_train_step.py --model hydravit_fmnist_patch7_28 --batch-size 128
    python benchmarks/bench_train_step.py --model hydravit_base_patch16_224 --batch-size 8 --threads 1 \
        --k 3 4 5 6 8 10 12 --rounds 3 --min-seconds 0 --active-slice     # the paper's shape, 224x224, ~12 min
"""
from __future__ import annotations

import os
import statistics

import timm
import torch
import torch.nn.functional as F

import hydravit  # noqa: F401  (registers the models)
from hydravit.models.subnet import extract_subnet
from hydravit.training.slice_optimizer import ActiveSliceAdamW
from paired_timing import images_per_second, print_ratios, timing_parser


def make_step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, optimize: bool = True,
              active_slice: bool = False, **forward_kwargs):
    if active_slice:
        optimizer: torch.optim.Optimizer = ActiveSliceAdamW(net.parameters(), net, lr=lr, weight_decay=0.05)
        optimizer.active_k = forward_kwargs['k']
    else:
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05, fused=True)  # as the trainer
    net.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x, **forward_kwargs), y).backward()
        if optimize:
            optimizer.step()
    return step


def print_three_way(model, ks, x, y, args) -> None:
    """sliced (paper AdamW), sliced (active-slice AdamW) and the standalone ViT, interleaved round by round."""
    print(f'{"k":>3} {"sliced":>8} {"active-slice":>13} {"timm":>8} {"sliced/timm":>12} {"active-slice/timm":>18} '
          f'{"load 1 min":>10}')
    ratios, lever = [], []
    for k in ks:
        vit = extract_subnet(model, k)
        steps = {'sliced': make_step(model, x, y, 1e-4, k=k),
                 'active': make_step(model, x, y, 1e-4, active_slice=True, k=k),
                 'timm': make_step(vit, x, y, 1e-4)}
        for step in steps.values():
            step()  # warm-up: buffers, optimizer state
        iters = 1 if args.min_seconds <= 0 else max(  # one step per round needs no calibration step
            1, round(args.min_seconds * images_per_second(steps['timm'], args.batch_size, 1) / args.batch_size))
        rates = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                rates[name].append(images_per_second(step, args.batch_size, iters))
        med = {name: statistics.median(r) for name, r in rates.items()}
        ratios.append(med['sliced'] / med['timm'])
        lever.append(med['active'] / med['timm'])
        print(f'{k:>3} {med["sliced"]:>8.2f} {med["active"]:>13.2f} {med["timm"]:>8.2f} {ratios[-1]:>12.3f} '
              f'{lever[-1]:>18.3f} {os.getloadavg()[0]:>10.2f}', flush=True)
    print(f'sliced/timm: min {min(ratios):.3f}; with --opt-active-slice: min {min(lever):.3f} (target >= 0.90)')


def main() -> None:
    p = timing_parser(__doc__, batch_size=128)
    p.add_argument('--no-optimizer-step', action='store_true',
                   help='time forward+backward only (isolates the cost of updating the full tensors)')
    p.add_argument('--active-slice', action='store_true',
                   help='also time the sliced model stepped by ActiveSliceAdamW (hydravit train --opt-active-slice)')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = timm.create_model(args.model)
    cfg = model.config
    x = torch.randn(args.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size)
    y = torch.randint(0, cfg.num_classes, (args.batch_size,))
    optimize = not args.no_optimizer_step
    what = 'fwd+bwd+AdamW' if optimize else 'fwd+bwd'
    print(f'{args.model}: train step ({what}), batch {args.batch_size}, fp32, {args.threads} threads, '
          f'{args.rounds} interleaved rounds, median')

    if args.active_slice:
        print_three_way(model, args.k or model.k_choices, x, y, args)
        return

    def make_steps(k: int):
        vit = extract_subnet(model, k)
        return make_step(model, x, y, 1e-4, optimize, k=k), make_step(vit, x, y, 1e-4, optimize)

    print_ratios(args.k or model.k_choices, make_steps, args, target=0.90)


if __name__ == '__main__':
    main()
