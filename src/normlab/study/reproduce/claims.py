"""The claims: each is data + a model variant per arm + the arms compared + a metric + the
direction the paper claims. Every setup, seed count, metric and direction here was written and
committed before the first run; none may change because of a verdict.

An arm is a ``CellConfig`` without its seed (``Claim.cells``); a ``Comparison`` turns the
per-seed values of its arms into one paired difference per seed, positive when the paper's
side is ahead (see ``verdict``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..config import CellConfig

__all__ = ["Arm", "Comparison", "Claim", "CLAIMS", "claim_ids", "get_claims", "FULL_SEEDS", "QUICK_SEEDS"]

FULL_SEEDS = 5
QUICK_SEEDS = 2

Values = Mapping[str, float]


@dataclass(frozen=True)
class Arm:
    """One arm: the cell fields that set it apart (task, norm spec or model variant, batch...)."""

    name: str
    task: str
    norm: str
    batch_size: int = 32
    fields: tuple[tuple[str, Any], ...] = ()  # further CellConfig fields, e.g. (("nproc", 2),)


@dataclass(frozen=True)
class Comparison:
    """One tested statement of a claim: ``diff(values)`` is the per-seed paired difference."""

    suffix: str  # "" when the claim has one comparison; else "a-in" etc. (the entry id is id.suffix)
    direction: str  # which arm the paper says wins, and the difference taken
    arms: tuple[str, ...]
    diff: Callable[[Values], float]
    rule: str = "directional"
    lower_is_better: bool = True
    metric: str = "validation error"
    curve_target: float | None = None  # metric = epochs until the validation error first is <= this


def beats(better: str, worse: str, lower_is_better: bool = True, suffix: str = "",
          metric: str = "validation error", curve_target: float | None = None) -> Comparison:
    """"``better`` beats ``worse``": difference worse - better (lower is better) or better - worse."""
    sign = 1.0 if lower_is_better else -1.0
    word = "lower" if lower_is_better else "higher"
    return Comparison(suffix, f"{better} wins ({word} {metric}); difference = {worse} - {better}"
                      if lower_is_better else f"{better} wins ({word} {metric}); difference = {better} - {worse}",
                      (better, worse), lambda v: sign * (v[worse] - v[better]), "directional", lower_is_better, metric,
                      curve_target)


def within(a: str, b: str, suffix: str = "", metric: str = "validation error") -> Comparison:
    """"``a`` within 2 se of ``b``": difference b - a (positive: a better)."""
    return Comparison(suffix, f"{a} within 2 se of {b}; difference = {b} - {a}", (a, b), lambda v: v[b] - v[a],
                      "within", True, metric)


@dataclass(frozen=True)
class Claim:
    id: str
    source: str
    paper_result: str
    setup: str  # data and models in words; the cell fields are appended by the report
    arms: tuple[Arm, ...]
    comparisons: tuple[Comparison, ...]
    base: Mapping[str, Any] = field(default_factory=dict)  # CellConfig fields shared by the arms (full run)
    quick: Mapping[str, Any] = field(default_factory=dict)  # overrides for --quick

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)

    def fields(self, arm: Arm, quick: bool) -> dict[str, Any]:
        from ..tasks import get_task

        kw: dict[str, Any] = {"curve_points": 2}
        kw.update(self.base)
        if quick:
            kw.update(self.quick)
        kw.update(task=arm.task, norm=arm.norm, batch_size=arm.batch_size)
        kw.update(dict(arm.fields))
        if not {"epochs", "base_lr", "train_subset"} <= kw.keys():  # the task's own defaults (claim 16)
            task = get_task(arm.task)
            kw.setdefault("epochs", task.default_epochs)
            kw.setdefault("base_lr", task.default_lr)
            kw.setdefault("train_subset", task.default_train_subset)
        return kw

    def cell(self, arm: Arm, seed: int, quick: bool) -> CellConfig:
        return CellConfig(seed=seed, **self.fields(arm, quick))

    def cells(self, seeds: list[int], quick: bool) -> dict[str, list[CellConfig]]:
        """Arm name -> its cells, one per seed (the same seeds for every arm: paired)."""
        return {a.name: [self.cell(a, s, quick) for s in seeds] for a in self.arms}


# Fashion-MNIST CNN (the study's 4-conv net, width 16), SGD momentum 0.9, lr 0.1 at batch 32 scaled
# linearly with the batch (the group-norm paper's rule), cosine decay, the same epochs at every batch.
FASHION = {"epochs": 2, "train_subset": 4000}
FASHION_QUICK = {"epochs": 1, "train_subset": 2000}
F = "fashion-mnist"

CLAIMS: tuple[Claim, ...] = (
    Claim("gn-small-batch", "Wu & He, ECCV 2018 (arXiv:1803.08494)",
          "BN's error rises sharply as the batch shrinks, GN's does not: the BN-minus-GN error gap is much "
          "larger at batch 2 than at batch 32",
          "Fashion-MNIST CNN, BN vs GN (4 groups) at batch 2 and at batch 32",
          (Arm("bn@2", F, "bn", 2), Arm("gn@2", F, "gn:4", 2), Arm("bn@32", F, "bn", 32), Arm("gn@32", F, "gn:4", 32)),
          (Comparison("", "GN gains more over BN at batch 2; difference = (bn@2 - gn@2) - (bn@32 - gn@32)",
                      ("bn@2", "gn@2", "bn@32", "gn@32"),
                      lambda v: (v["bn@2"] - v["gn@2"]) - (v["bn@32"] - v["gn@32"])),),
          FASHION, FASHION_QUICK),
    Claim("brn-micro-batch", "Ioffe, NIPS 2017 (arXiv:1702.03275)",
          "batch renormalization beats batch norm with micro-batches (batch 4)",
          "Fashion-MNIST CNN, BRN vs BN at batch 4",
          (Arm("brn@4", F, "brn", 4), Arm("bn@4", F, "bn", 4)), (beats("brn@4", "bn@4"),), FASHION, FASHION_QUICK),
    Claim("sn-small-batch", "Luo, Ren & Peng, ICLR 2019 (arXiv:1806.10779)",
          "switchable norm beats batch norm at batch 2 (per GPU)",
          "Fashion-MNIST CNN, SN vs BN at batch 2",
          (Arm("sn@2", F, "sn", 2), Arm("bn@2", F, "bn", 2)), (beats("sn@2", "bn@2"),), FASHION, FASHION_QUICK),
    Claim("on-batch-one", "Chiley et al., NeurIPS 2019 (arXiv:1905.05894)",
          "online normalization at batch 1 performs on par with batch norm at ordinary batch sizes",
          "Fashion-MNIST CNN, online norm at batch 1 vs BN at batch 32 (same epochs; lr scaled linearly)",
          (Arm("on@1", F, "on", 1), Arm("bn@32", F, "bn", 32)), (within("on@1", "bn@32"),), FASHION, FASHION_QUICK),
    Claim("wn-mobn", "Salimans & Kingma, NIPS 2016 (arXiv:1602.07868)",
          "weight norm combined with mean-only batch norm does at least as well as batch norm (CIFAR-10 CNN)",
          "Fashion-MNIST CNN at batch 32: every conv weight-normalized + mean-only BN, vs plain convs + BN",
          (Arm("wn+mobn", "reproduce/fashion-wn", "mobn"), Arm("bn", F, "bn")), (beats("wn+mobn", "bn"),),
          {"epochs": 3, "train_subset": 4000}, {"epochs": 1, "train_subset": 2000}),
    Claim("ln-rnn", "Ba, Kiros & Hinton 2016 (arXiv:1607.06450); Cooijmans et al., ICLR 2017 (arXiv:1603.09025)",
          "layer-normalized and batch-normalized LSTMs learn faster and reach lower error than a plain LSTM "
          "(sequential MNIST)",
          "sklearn digits read pixel by pixel (64 steps), LSTM of 48 units + linear head, batch 32, SGD "
          "momentum 0.9, lr 0.1, the same number of steps for each",
          (Arm("lstm", "reproduce/seq-digits", "lstm"), Arm("ln-lstm", "reproduce/seq-digits", "ln-lstm"),
           Arm("bn-lstm", "reproduce/seq-digits", "bn-lstm")),
          (beats("ln-lstm", "lstm", suffix="ln"), beats("bn-lstm", "lstm", suffix="bn")),
          {"epochs": 8, "width": 48, "lr_rule": "none"}, {"epochs": 3}),
    Claim("in-contrast", "Ulyanov, Vedaldi & Lempitsky 2016 (arXiv:1607.08022); Nam & Kim, NeurIPS 2018 "
          "(arXiv:1805.07925)",
          "instance norm removes instance-specific contrast: (a) IN and BIN are more robust than BN to a change "
          "of contrast and brightness; (b) where contrast is the label IN cannot learn it (chance) and BIN's "
          "gates rho move toward BN",
          "Fashion-MNIST CNN at batch 32. (a) trained on ordinary images; metric = error on test images with "
          "contrast x0.5 and brightness +0.3 minus error on the originals. (b) each image's contrast scaled by "
          "0.25/0.5/0.75/1 and that level is the label (chance error 0.75): IN vs BN error; BIN's mean rho "
          "after training on this task vs after training on ordinary Fashion-MNIST (rho trained at the "
          "network's learning rate, not the paper's 10x)",
          (Arm("bn", "reproduce/fashion-contrast-shift", "bn"), Arm("in", "reproduce/fashion-contrast-shift", "in"),
           Arm("bin", "reproduce/fashion-contrast-shift", "bin"),
           Arm("bn/contrast-label", "reproduce/fashion-contrast-label", "bn"),
           Arm("in/contrast-label", "reproduce/fashion-contrast-label", "in"),
           Arm("bin-rho/contrast-label", "reproduce/fashion-contrast-label-rho", "bin"),
           Arm("bin-rho/ordinary", "reproduce/fashion-rho", "bin")),
          (beats("in", "bn", suffix="a-in", metric="error increase under the contrast change"),
           beats("bin", "bn", suffix="a-bin", metric="error increase under the contrast change"),
           Comparison("b-in", "IN loses the contrast label that BN keeps; difference = in/contrast-label - "
                              "bn/contrast-label (error)", ("in/contrast-label", "bn/contrast-label"),
                      lambda v: v["in/contrast-label"] - v["bn/contrast-label"]),
           beats("bin-rho/contrast-label", "bin-rho/ordinary", lower_is_better=False, suffix="b-bin",
                 metric="mean rho (1 = BN, 0 = IN)")),
          {"epochs": 3, "train_subset": 4000}, {"epochs": 2, "train_subset": 2000}),
    Claim("input-scaling", "LeCun, Bottou, Orr & Mueller, Efficient BackProp 1998; the seed's two-feature example",
          "an MLP learns better from standardized inputs than from raw inputs of very different scales",
          "breast cancer (scikit-learn, 569 x 30 features spanning ~1e-3..4e3), MLP 30-64-64-2 ReLU, batch 32, "
          "SGD momentum 0.9, lr 0.01 (no scaling), raw features vs features standardized with the training "
          "split's mean and std",
          (Arm("standardized", "reproduce/cancer-std", "none"), Arm("raw", "reproduce/cancer-raw", "none")),
          (beats("standardized", "raw"),), {"epochs": 40, "base_lr": 0.01, "lr_rule": "none", "width": 64},
          {"epochs": 20}),
    Claim("snn-deep-mlp", "Klambauer, Unterthiner, Mayr & Hochreiter, NIPS 2017 (arXiv:1706.02515)",
          "deep self-normalizing (SELU) networks without norm layers beat ReLU networks on tabular (UCI) data",
          "sklearn digits as a table (UCI optical digits, 64 standardized features), 16-layer MLP of width 64 "
          "without norm layers: SELU + LeCun-normal init vs ReLU + He-normal init, batch 32, SGD momentum 0.9, "
          "lr 0.01",
          (Arm("selu", "reproduce/digits-mlp16", "selu"), Arm("relu", "reproduce/digits-mlp16", "relu")),
          (beats("selu", "relu"),), {"epochs": 30, "base_lr": 0.01, "lr_rule": "none", "width": 64},
          {"epochs": 15}),
    Claim("bn-high-lr", "Ioffe & Szegedy, ICML 2015 (arXiv:1502.03167)",
          "batch norm allows much higher learning rates (where the plain network diverges) and reaches a "
          "target accuracy in fewer steps",
          "sklearn digits CNN (3 convs, width 16), batch 32. (a) lr 1.0 (10x the study's default; fixed "
          "before any run), BN vs no norm, validation error (a diverged run scores chance, 0.9). (b) at the "
          "default lr 0.1: epochs until the validation error first reaches 0.1 (8 checks per epoch; a run "
          "that never reaches it scores one check past its end)",
          (Arm("bn@lr1", "digits", "bn", fields=(("base_lr", 1.0),)),
           Arm("none@lr1", "digits", "none", fields=(("base_lr", 1.0),)),
           Arm("bn@lr0.1", "digits", "bn", fields=(("curve_points", 8),)),
           Arm("none@lr0.1", "digits", "none", fields=(("curve_points", 8),))),
          (beats("bn@lr1", "none@lr1", suffix="a-high-lr"),
           beats("bn@lr0.1", "none@lr0.1", suffix="b-steps", metric="epochs to validation error 0.1",
                 curve_target=0.1)),
          {"epochs": 4}, {"epochs": 2}),
    Claim("ghn-no-bn", "Fan, NIPS 2017 (arXiv:1710.10328)",
          "a generalized Hamming network without batch norm trains about as fast as the network with batch "
          "norm (after one epoch)",
          "Fashion-MNIST CNN at batch 32, one epoch: generalized-Hamming convs without norm vs ordinary convs "
          "with BN and without any norm; difference = |ghn - none| - |ghn - bn| (positive: closer to BN)",
          (Arm("ghn", "reproduce/fashion-ghn", "ghn"), Arm("bn", F, "bn"), Arm("none", F, "none")),
          (Comparison("", "ghn closer to bn than to none; difference = |ghn - none| - |ghn - bn|",
                      ("ghn", "bn", "none"), lambda v: abs(v["ghn"] - v["none"]) - abs(v["ghn"] - v["bn"])),),
          {"epochs": 1, "train_subset": 8000}, {"epochs": 1, "train_subset": 3000}),
    Claim("spd-bn", "Brooks, Schwander, Barbaresco, Schneider & Cord, NeurIPS 2019 (arXiv:1909.02414)",
          "an SPD network with Riemannian batch norm beats the same network without it (faster training, "
          "better accuracy)",
          "7x7 region covariance descriptors (Tuzel et al. 2006: x, y, I, |Ix|, |Iy|, |Ixx|, |Iyy| over the "
          "pixels) of the sklearn digits; BiMap(7-6) [BN] ReEig BiMap(6-4) [BN] ReEig LogEig + linear; batch "
          "32, SGD momentum 0.9, lr 0.1",
          (Arm("spdbn", "reproduce/digits-cov", "spdbn"), Arm("none", "reproduce/digits-cov", "none")),
          (beats("spdbn", "none"),), {"epochs": 10}, {"epochs": 4}),
    Claim("sync-bn", "distributed data parallel practice (Peng et al., MegDet, CVPR 2018; torch SyncBatchNorm)",
          "synchronized BN over 2 processes at per-process batch 2 behaves as BN at batch 4, and beats "
          "per-process (local) BN at batch 2",
          "Fashion-MNIST CNN, 2 processes (gloo, DDP) x batch 2 with BN statistics synchronized or local, vs one "
          "process at batch 4; the same lr (global batch 4)",
          (Arm("sync 2x2", F, "bn", 2, (("nproc", 2), ("sync", True))),
           Arm("local 2x2", F, "bn", 2, (("nproc", 2), ("sync", False))),
           Arm("bn@4", F, "bn", 4)),
          (within("sync 2x2", "bn@4", suffix="match"), beats("sync 2x2", "local 2x2", suffix="beats-local")),
          {"epochs": 2, "train_subset": 2000}, {"epochs": 1, "train_subset": 1000}),
    Claim("gn-ws", "Qiao, Wang, Liu, Shen & Yuille 2019 (arXiv:1903.10520)",
          "GN + weight standardization matches BN at large batch and beats it at micro-batch",
          "Fashion-MNIST CNN, GN (8 groups) + weight standardization vs BN at batch 32 and at batch 2",
          (Arm("gn+ws@32", "reproduce/fashion-ws", "gn:8+ws", 32), Arm("bn@32", F, "bn", 32),
           Arm("gn+ws@2", "reproduce/fashion-ws", "gn:8+ws", 2),
           Arm("bn@2", F, "bn", 2)),
          (within("gn+ws@32", "bn@32", suffix="match@32"), beats("gn+ws@2", "bn@2", suffix="beats@2")),
          FASHION, FASHION_QUICK),
    Claim("frn-batch-one", "Singh & Krishnan, CVPR 2020 (arXiv:1911.09737)",
          "filter response normalization does not depend on the batch: at batch 1 it performs as at batch 32",
          "Fashion-MNIST CNN, FRN at batch 1 vs FRN at batch 32 (same epochs; lr scaled linearly)",
          (Arm("frn@1", F, "frn", 1), Arm("frn@32", F, "frn", 32)), (within("frn@1", "frn@32"),),
          FASHION, FASHION_QUICK),
    Claim("dyt-ln", "Zhu, Chen, He, LeCun & Liu, CVPR 2025 (arXiv:2503.10622)",
          "dynamic tanh (DyT) replaces layer norm in transformers without loss of accuracy",
          "the study's transformer task with its defaults (epochs, lr, data), DyT vs layer norm over the channel axis",
          (Arm("dyt", "transformer", "dyt"), Arm("ln", "transformer", "lnc")), (within("dyt", "ln"),)),
)


def claim_ids() -> list[str]:
    return [c.id for c in CLAIMS]


def get_claims(ids: list[str] | None = None) -> list[Claim]:
    """The claims named (all when ``None``), in the order given; unknown ids are an error."""
    if ids is None:
        return list(CLAIMS)
    known = {c.id: c for c in CLAIMS}
    bad = [i for i in ids if i not in known]
    if bad:
        raise ValueError(f"unknown claim id(s) {', '.join(bad)}; known: {', '.join(known)}")
    return [known[i] for i in dict.fromkeys(ids)]
