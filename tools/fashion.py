"""The Fashion-MNIST verdict: docs/FASHION.md's preregistered rules applied to the finished seeds.

    make fashion-seeds                                  # runs seeds 0-2 (tools.seeds --config configs/fashion.yaml)
    python -m tools.fashion --out docs/results/fashion.json --figures docs/figures/fashion   # + fashion.md
    python -m tools.fashion --pilot 100 --out docs/results/fashion_pilot.json   # size the sample count first

Reads each seed's reports/comparison.json, controls/controls.json and
analysis/summary.json from its DVC experiment (seeds-<s>-fashion), writes
every model's FD (raw, floor, floor-subtracted), KID, held-out loss and
memorisation, every paired contrast with its interval, the seed's analyses
(loss along each task vector, gradient conflict), and the verdict with the
rule that decided it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from dtm_core.distances import verdict
from dtm_core.io import atomic_file, write_json
from tools import command, exps
from tools.seeds import variant_name

SEEDS = (0, 1, 2)
RATIO = 0.85  # merged's floor-subtracted FD at most this share of shared's and the base's
HALF_WIDTH = 0.05  # the refutation needs merged - shared's half-width within this share of shared's
MAX_SAMPLES = 10_000  # per model and noise seed: the most a seed's evaluation affords on 2 CPU cores (FASHION.md)


def below(ci: list[float]) -> bool:
    return verdict(ci) == "lower"


def ties(ci: list[float]) -> bool:
    return verdict(ci) == "not distinguishable"


def seed_summary(seed: int, comparison: dict, controls: dict, analysis: Optional[dict] = None,
                 task_vectors: Optional[dict] = None) -> dict:
    """One seed's numbers in the rules' terms: F(m) = FD - floor, and the four intervals the rules read
    (``analysis``, the analysis stage's summary, and ``task_vectors``, Fig. 6b's norms and cosines, are carried
    along: no rule reads them)."""
    models = dict(comparison["models"])
    for name, m in controls.get("metrics", {}).items():
        models[name] = {**m, "fd_minus_floor": m["fd"] - comparison["floor"]["fd_at_n"]}
    c, k = comparison["contrasts"], controls.get("contrasts", {})
    F = {name: m["fd_minus_floor"] for name, m in models.items()}
    return {
        "seed": seed,
        "models": {name: {key: m.get(key) for key in ("fd", "fd_minus_floor", "fd_train", "kid", "heldout_loss",
                                                     "memorised_fraction", "closer_to_train")}
                   for name, m in models.items()},
        "floor": comparison["floor"],
        "contrasts": {key: {"fd": v["fd"], "fd_ci": v["fd_ci"],
                            **({"heldout_loss": v["heldout_loss"]["delta"], "heldout_loss_ci": v["heldout_loss"]["ci"]}
                               if "heldout_loss" in v else {})}
                      for key, v in {**c, **k}.items()},
        "ratio_merged_shared": F["merged"] / F["shared"],
        "ratio_merged_pretrained": F["merged"] / F["pretrained"],
        "f_shared": F["shared"],
        "analysis": analysis or {},
        "task_vectors": task_vectors or {},
    }


def half_widths(seeds: list[dict]) -> tuple[list[float], list[float]]:
    """Per seed, merged - shared's interval half-width and the refutation's limit, 5% of F(shared)."""
    widths = [(s["contrasts"]["merged_minus_shared"]["fd_ci"][1] - s["contrasts"]["merged_minus_shared"]["fd_ci"][0])
              / 2 for s in seeds]
    return widths, [HALF_WIDTH * s["f_shared"] for s in seeds]


def decide(seeds: list[dict]) -> dict:
    """Reproduces / Partial / Refutes / Inconclusive, exactly as docs/FASHION.md words them; pending before three
    seeds have run."""
    if len(seeds) < len(SEEDS):  # every rule reads three seeds: fewer decide nothing yet
        return {"verdict": "pending", "rule": f"{len(seeds)} of the {len(SEEDS)} verdict seeds have run"}
    if len(seeds) > len(SEEDS):  # the rules were fixed for three seeds, not for a larger count chosen later
        return {"verdict": "undefined", "rule": f"the rules read {len(SEEDS)} seeds, {len(seeds)} were given"}
    ci = lambda s, key: s["contrasts"][key]["fd_ci"]  # noqa: E731
    ms, mp = "merged_minus_shared", "merged_minus_pretrained"
    soup, scaled = "merged_minus_soup", "merged_scaled_minus_shared_scaled"
    controls_present = all(soup in s["contrasts"] and scaled in s["contrasts"] for s in seeds)
    if controls_present and all(
            s["ratio_merged_shared"] <= RATIO and s["ratio_merged_pretrained"] <= RATIO and below(ci(s, ms))
            and below(ci(s, mp)) and below(ci(s, soup)) and below(ci(s, scaled)) for s in seeds):
        return {"verdict": "reproduces", "rule": "every seed: ratios <= 0.85, merged below shared, the base, "
                                                 "the soup and the scaled-back shared fine-tune"}
    if controls_present and all(below(ci(s, ms)) for s in seeds) and (
            sum(ties(ci(s, soup)) for s in seeds) >= 2 or sum(ties(ci(s, scaled)) for s in seeds) >= 2):
        return {"verdict": "partial", "rule": "merged below shared in every seed, but it ties the soup or the "
                                              "scaled-back shared fine-tune in at least 2 seeds: averaging"}
    widths, limits = half_widths(seeds)
    if all(w <= limit for w, limit in zip(widths, limits)) and sum(not below(ci(s, ms)) for s in seeds) >= 2:
        return {"verdict": "refutes", "rule": "half-widths within 5% of shared's floor-subtracted FD, and merged - "
                                              "shared contains zero or lies above it in at least 2 seeds"}
    return {"verdict": "inconclusive", "rule": "none of the three rules holds",
            "half_widths": widths, "half_width_limits": limits}


def reachable(seeds: list[dict]) -> list[str]:
    """The verdicts that the seeds still to run could bring about, given the finished ``seeds``: each rule is
    tried with the missing seeds filled by ones that meet it."""
    def seed(ms: list[float], controls: list[float], ratio: float) -> dict:
        keys = ("merged_minus_shared", "merged_minus_pretrained", "merged_minus_soup",
                "merged_scaled_minus_shared_scaled")
        return {"contrasts": {k: {"fd_ci": ms if i < 2 else controls} for i, k in enumerate(keys)},
                "ratio_merged_shared": ratio, "ratio_merged_pretrained": ratio, "f_shared": 1.0}

    ideal = (seed([-2.0, -1.0], [-2.0, -1.0], 0.5), seed([-2.0, -1.0], [-1.0, 1.0], 0.5),
             seed([-0.01, 0.01], [-1.0, 1.0], 1.0))  # reproduces, partial (averaging), refutes
    missing = max(0, len(SEEDS) - len(seeds))
    if not missing:
        return [decide(seeds)["verdict"]]
    return sorted({decide(seeds + [s] * missing)["verdict"] for s in ideal} | {"inconclusive"})


COLUMNS = (("fd", 4), ("fd_minus_floor", 4), ("fd_train", 4), ("kid", 5), ("heldout_loss", 6),
           ("memorised_fraction", 4))  # the model table's keys and decimals


def headline(result: dict) -> str:
    """The verdict in one plain paragraph, counted from the seeds: the README's headline."""
    seeds = result["seeds"]
    k = len(seeds)

    def count(key: str, test) -> str:
        n = sum(test(s["contrasts"][key]["fd_ci"]) for s in seeds if key in s["contrasts"])
        return f"{n} of {k}"

    widths, limits = half_widths(seeds)
    mean = lambda key: sum(s["models"][key]["fd"] for s in seeds) / k  # noqa: E731
    return (
        f"Fashion-MNIST, training seeds {', '.join(str(s['seed']) for s in seeds)}: the preregistered verdict is "
        f"**{result['verdict']}** ({result['rule']}). Merged − shared FD ties in {count('merged_minus_shared', ties)}"
        f" seeds and is below zero in {count('merged_minus_shared', below)}; merged is below the base in "
        f"{count('merged_minus_pretrained', below)}; merged ties the soup in {count('merged_minus_soup', ties)}"
        f" and the scaled merge ties the scaled-back shared fine-tune in "
        f"{count('merged_scaled_minus_shared_scaled', ties)}. Mean FD over the seeds: base "
        f"{mean('pretrained'):.4f}, shared {mean('shared'):.4f}, merged {mean('merged'):.4f} (floor "
        f"{sum(s['floor']['fd_at_n'] for s in seeds) / k:.4f}). Merged − shared's half-widths "
        f"{min(widths):.4f}–{max(widths):.4f} against the refutation's limit of 5% of F(shared) "
        f"({min(limits):.4f}–{max(limits):.4f})"
        + (": at this sample count no refutation is possible." if min(widths) > max(limits) else ".")
        + (f" Still possible by the rules once every seed has run: {', '.join(reachable(seeds))}."
           if result["verdict"] == "pending" else "")
    )


def render(result: dict) -> str:
    """fashion.json as the tables of docs/FASHION.md: per seed every model, then every contrast, then the verdict."""
    lines = ["| seed | model | FD | FD − floor | FD vs train | KID | held-out loss | memorised |", "|---" * 8 + "|"]
    for s in result["seeds"]:
        for name, m in s["models"].items():
            cells = ["–" if m.get(k) is None else f"{m[k]:.{d}f}" for k, d in COLUMNS]
            lines.append(f"| {s['seed']} | {name} | " + " | ".join(cells) + " |")
        lines.append(f"| {s['seed']} | floor (real vs real, n={s['floor']['n']}) | {s['floor']['fd_at_n']:.4f} |"
                     + " |" * 5)
    lines += ["", "| seed | contrast | FD difference [95% CI] | verdict |", "|---|---|---|---|"]
    for s in result["seeds"]:
        for key, c in s["contrasts"].items():
            lines.append(f"| {s['seed']} | {key.replace('_minus_', ' − ')} | {exps.with_ci(c['fd'], c['fd_ci'])} | "
                         f"{verdict(c['fd_ci'])} |")
    lines += ["", "| seed | task-vector norms, range 0 to N−1 (Fig. 6b) | largest cosine between ranges | "
              "gradient cosine between t-bins, base → merged (Fig. 1) | held-out loss at λ = 1 vs the base, "
              "all t (own range) |", "|---|---|---|---|---|"]
    for s in result["seeds"]:
        tv, a = s.get("task_vectors") or {}, s.get("analysis") or {}
        norms = ", ".join(f"{x:.3f}" for x in tv.get("norms") or []) or "–"
        cos = tv.get("cosine") or []
        off = max((c for i, r in enumerate(cos) for j, c in enumerate(r) if i != j), default=None)
        g = a.get("gradient_conflict", {})
        grad = " → ".join(f"{g[m]['mean_cosine_between_bins']:.3f}" for m in ("pretrained", "merged") if m in g) or "–"
        lines.append(f"| {s['seed']} | {norms} | {'–' if off is None else f'{off:.3f}'} | {grad} | "
                     f"{loss_at_one(a.get('loss_along_tau')) or '–'} |")
    verdict_line = result.get("headline") or f"Verdict: **{result['verdict']}** ({result['rule']})."
    return "\n".join(lines + ["", verdict_line, ""])


def loss_at_one(summary: Optional[dict]) -> str:
    """Each source's held-out loss at lambda = 1 as % change from lambda = 0, over all t (and its own range)."""
    if not summary or 1.0 not in summary["lambdas"] or 0.0 not in summary["lambdas"]:
        return ""
    one, zero = summary["lambdas"].index(1.0), summary["lambdas"].index(0.0)
    pct = lambda v: f"{100.0 * (v[one] / v[zero] - 1.0):+.2f}%"  # noqa: E731
    return "; ".join(f"{name} {pct(rows['all_t'])}" + (f" ({pct(rows['own_range'])})" if "own_range" in rows else "")
                     for name, rows in summary["sources"].items())


# the figures of a seed's experiment that docs/FASHION.md shows: Fig. 1 before and after, Fig. 6b
FIGURES = ("analysis/gradient_conflict_pretrained.png", "analysis/gradient_conflict_merged.png",
           "task_vectors/tv_norms.png", "task_vectors/tv_cosine.png")


def plot_loss_along_tau(summary: dict, path: Path) -> None:
    """Held-out loss of theta + lambda tau against lambda: every range's tau (over all t and over its own range)
    and the shared fine-tune's."""
    from dtm_core.plots import new_figure, save_figure

    lam, sources = summary["lambdas"], summary["sources"]
    fig, ax = new_figure(6.0, 4.0)
    zero = lam.index(0.0) if 0.0 in lam else 0

    def change(values):  # the losses differ by fractions of a percent: plotted against the base's (lambda = 0)
        return [100.0 * (v / values[zero] - 1.0) for v in values]

    for name, rows in sources.items():
        line = ax.plot(lam, change(rows["all_t"]), marker="o", label=f"{name}, all t")[0]
        if "own_range" in rows:
            ax.plot(lam, change(rows["own_range"]), marker="x", linestyle="--", color=line.get_color(),
                    label=f"{name}, its own range")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("λ (0: the base, 1: the fine-tuned model)")
    ax.set_ylabel(f"held-out ε-MSE, % change from λ = {lam[zero]:g}")
    ax.set_title("loss along θ + λτ")
    ax.legend(fontsize=6)
    save_figure(fig, path)


def write_figures(seed: int, name: str, summary: dict, out: Path) -> list[str]:
    """The seed's figures under ``out``: the loss along tau, drawn here, and :data:`FIGURES` from its experiment."""
    written = []
    if summary.get("loss_along_tau"):
        plot_loss_along_tau(summary["loss_along_tau"], out / f"seed-{seed}-loss_along_tau.png")
        written.append(f"seed-{seed}-loss_along_tau.png")
    for path in FIGURES:
        try:
            data = exps.experiment_bytes(name, path)
        except exps.ExperimentError:
            continue  # an analysis that was off draws no figure
        target = out / f"seed-{seed}-{Path(path).name}"
        with atomic_file(target, "wb") as handle:
            handle.write(data)
        written.append(target.name)
    return written


def pilot_size(comparison: dict, step: int = 1000) -> dict:
    """The sample count the verdict seeds need, from the pilot's merged - shared half-width alone.

    The paired interval's half-width falls as 1/sqrt(n): n = n0 (h0 / h*)^2 with h* the refutation's limit,
    5% of shared's floor-subtracted FD, rounded up to a multiple of ``step`` and capped at :data:`MAX_SAMPLES`
    (``capped`` then says that the refutation's precision is out of reach). No contrast's sign or size enters.
    """
    seeds = comparison["settings"].get("noise_seeds", 1)  # the interval pools every noise seed's samples
    n0 = comparison["settings"]["num_samples"] * seeds
    lo, hi = comparison["contrasts"]["merged_minus_shared"]["fd_ci"]
    h0, limit = (hi - lo) / 2, HALF_WIDTH * comparison["models"]["shared"]["fd_minus_floor"]
    if limit <= 0:
        raise exps.ExperimentError("shared's floor-subtracted FD is not above zero: no half-width can be 5% of it")
    need = int(-(-n0 * (h0 / limit) ** 2 / seeds // step) * step)  # evaluate.num_samples is per noise seed
    return {"pilot_num_samples": n0, "half_width": h0, "half_width_limit": limit, "needed_num_samples": need,
            "num_samples": min(need, MAX_SAMPLES), "capped": need > MAX_SAMPLES,
            "rule": f"n0 (h0 / (0.05 F(shared)))^2 over the noise seeds, rounded up, at most {MAX_SAMPLES}"}


@command("fashion")
def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.fashion", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--pilot", type=int, metavar="SEED",
                    help="size evaluate.num_samples from this pilot seed's merged - shared half-width instead")
    ap.add_argument("--out", type=Path, default=Path("reports/fashion.json"))
    ap.add_argument("--figures", type=Path, metavar="DIR",
                    help="also write each seed's figures here (loss along tau, gradient conflict, Fig. 6b)")
    exps.add_baseline_argument(ap)
    args = ap.parse_args(argv)
    if args.pilot is not None:
        name = variant_name(args.pilot, "fashion")
        hint = f"run python -m tools.seeds --config configs/fashion.yaml --label fashion --seeds {args.pilot}"
        size = {"pilot": name, **pilot_size(exps.report(name, hint))}
        write_json(args.out, size)
        print(f"evaluate.num_samples: {size['num_samples']} ({args.out})")
        return 0
    rows = []
    for seed in args.seeds:
        name = variant_name(seed, "fashion")
        comparison = exps.report(name, "run make fashion-seeds")
        read = lambda path, name=name: exps.experiment_file(name, path) or {}  # noqa: E731
        analysis = read("analysis/summary.json")
        rows.append(seed_summary(seed, comparison, read("controls/controls.json"), analysis,
                                 {"norms": read("task_vectors/norms.json").get("total"),
                                  "cosine": read("task_vectors/cosine.json").get("cosine")}))
        if args.figures:
            rows[-1]["figures"] = write_figures(seed, name, analysis, args.figures)
    result = {"rules": "docs/FASHION.md", "seeds": rows, **decide(rows)}
    result["headline"] = headline(result)
    exps.write_report(args.out, result, render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
