"""Training-step speed of the sliced universal model vs a standalone timm ViT of the same shape.

Per k: images/s of one step (forward + cross-entropy + backward + AdamW step) of ``model(x, k=k)``
divided by that of the extracted timm ``VisionTransformer``, both measured in this run with
interleaved rounds, medians (target: >= 0.90). The sliced model's AdamW step updates its full
tensors (the paper's behaviour: moments and weight decay also move the inactive tail), which is the
main cost the standalone model does not pay at small k.

    python benchmarks/bench_train_step.py --model hydravit_fmnist_patch7_28 --batch-size 128
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

import hydravit  # noqa: F401  (registers the models)
from hydravit.models.subnet import extract_subnet
from paired_timing import print_ratios, timing_parser


def make_step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, optimize: bool = True,
              **forward_kwargs):
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05, fused=True)  # as the trainer
    net.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x, **forward_kwargs), y).backward()
        if optimize:
            optimizer.step()
    return step


def main() -> None:
    p = timing_parser(__doc__, batch_size=128)
    p.add_argument('--no-optimizer-step', action='store_true',
                   help='time forward+backward only (isolates the cost of updating the full tensors)')
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

    def make_steps(k: int):
        vit = extract_subnet(model, k)
        return make_step(model, x, y, 1e-4, optimize, k=k), make_step(vit, x, y, 1e-4, optimize)

    print_ratios(args.k or model.k_choices, make_steps, args, target=0.90)


if __name__ == '__main__':
    main()
