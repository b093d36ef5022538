"""The ``normlab`` command: ``list`` the methods, ``study`` and ``report`` (which norm for my
network and batch size), ``bench`` (speed against PyTorch's native kernels)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


# Methods that are not a drop-in norm layer for one channel count, so not ``make_norm`` specs:
# (how to use it, what it is, paper).
OTHER_METHODS = [
    ("normlab.weight_norm / data_dependent_init", "weight normalization w = g v/||v|| and its data-dependent init",
     "Salimans & Kingma, NIPS 2016 (arXiv:1602.07868)"),
    ("normlab.SPDBatchNorm", "Riemannian batch norm for SPD matrices (Karcher mean, transport, SPD bias)",
     "Brooks et al., NeurIPS 2019 (arXiv:1909.02414)"),
    ("normlab.LayerNormLSTM(Cell)", "LSTM with layer norm on both projections and the cell readout",
     "Ba, Kiros & Hinton 2016 (arXiv:1607.06450)"),
    ("normlab.BatchNormLSTM", "LSTM with per-time-step batch statistics, gamma 0.1",
     "Cooijmans et al., ICLR 2017 (arXiv:1603.09025)"),
    ("normlab.self_normalizing", "SELU network: LeCun-normal init, SELU, alpha dropout",
     "Klambauer et al., NIPS 2017 (arXiv:1706.02515)"),
    ("normlab.GeneralizedHamming{Linear,Conv2d}", "bias fixed analytically by the generalized Hamming distance",
     "Fan, NIPS 2017 (arXiv:1710.10328)"),
    ("normlab.InputStandardizer", "input-feature standardization (or min-max) with exact streaming moments",
     "standard practice; exact merges of Chan, Golub & LeVeque 1979"),
    ("normlab.weight_standardize / remove_weight_standardization",
     "weight standardization per output unit, removable; convert(model, 'SPEC+ws') for the conv before each norm",
     "Qiao, Wang, Liu, Shen & Yuille 2019 (arXiv:1903.10520)"),
    ("normlab.normalizer_free", "norms removed, scaled WS (learned gain), gain-corrected activations",
     "Brock, De & Smith, ICLR 2021 (arXiv:2101.08692)"),
    ("normlab.adaptive_clip_grad_", "unit-wise adaptive gradient clipping",
     "Brock, De, Smith & Simonyan, ICML 2021 (arXiv:2102.06171)"),
    ("normlab.CrossIterationBatchNorm", "BN statistics over k iterations, wraps the conv; convert(model, 'cbn:k')",
     "Yao, Cao, Zheng, Huang & Lin, CVPR 2021 (arXiv:2002.05712)"),
    ("normlab.InPlaceABN", "batch norm + leaky ReLU keeping only its output; make_norm(spec, C, act=...) for any norm",
     "Rota Bulo, Porzi & Kontschieder, CVPR 2018 (arXiv:1712.02616)"),
]


def _cmd_list(args: argparse.Namespace) -> int:
    from .registry import describe_norms

    entries = describe_norms()
    width = max(len(e.name) for e in entries)
    print("# norm specs for make_norm / convert / study (spec[:arg])")
    for e in entries:
        arg = f" (:{e.arg})" if e.arg else ""
        print(f"{e.name:<{width}}  {e.description}{arg} -- {e.paper}")
        if args.verbose:
            print(f"{'':<{width}}    normalizes over: {e.axes}")
            print(f"{'':<{width}}    paper: {e.paper}")
    print("# other methods (layers and model transforms)")
    for name, what, paper in OTHER_METHODS:
        print(f"  {name}: {what} -- {paper}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="normlab", description="Neural-network normalization: layers, studies, benchmarks.")
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="every registered norm with its description")
    p.add_argument("-v", "--verbose", action="store_true", help="also the axes each norm normalizes over and its paper")
    p.set_defaults(func=_cmd_list)
    from .bench_cli import add_parser as _add_bench_command  # bench

    _add_bench_command(sub)
    from .study.command import add_subcommands as _add_study_commands  # study, report

    _add_study_commands(sub)
    from .study.reproduce.command import add_subcommand as _add_reproduce_command  # reproduce

    _add_reproduce_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # `normlab` alone: the whole help (commands and what they do), as a usage error
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
