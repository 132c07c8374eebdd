"""Inference speed of the sliced universal model vs a standalone timm ViT of the same shape.

Prints, per k, images/s of ``model(x, k=k)`` divided by images/s of the extracted timm
``VisionTransformer``, both measured in this run with interleaved rounds (target: >= 0.95).

    python benchmarks/bench_slicing.py --model hydravit_fmnist_patch7_28 --batch-size 256
    python benchmarks/bench_slicing.py --model hydravit_base_patch16_224 --batch-size 32 --k 3 6 12
"""
from __future__ import annotations

import timm
import torch

import hydravit  # noqa: F401  (registers the models)
from hydravit.models.subnet import extract_subnet
from paired_timing import print_ratios, timing_parser


def main() -> None:
    args = timing_parser(__doc__, batch_size=256).parse_args()
    torch.set_num_threads(args.threads)

    model = timm.create_model(args.model).eval()
    cfg = model.config
    x = torch.randn(args.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size)
    print(f'{args.model}: batch {args.batch_size}, fp32, {args.threads} threads, {args.rounds} rounds, median')

    def make_steps(k: int):
        vit = extract_subnet(model, k)
        return (lambda: model(x, k=k)), (lambda: vit(x))

    with torch.inference_mode():
        print_ratios(args.k or model.k_choices, make_steps, args, target=0.95)


if __name__ == '__main__':
    main()
