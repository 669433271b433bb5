"""Distances between feature sets (FD, KID), their bootstrap intervals, and memorisation.

The statistics are clean-fid's: FD is ``cleanfid.fid.frechet_distance``'s formula, written out
here because clean-fid calls scipy's ``sqrtm`` with an argument scipy 1.18 removed; KID is
``cleanfid.fid.kernel_distance``'s estimator and subset draws, written out
here to run twice as fast (tests check it gives clean-fid's number). Both are
computed on features extracted at the
images' native resolution: clean-fid's ``compute_fid`` would resize every
image to 299x299 first, which changes the numbers for a custom extractor.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np

from .errors import ConfigError

Statistic = Callable[[np.ndarray, np.ndarray], float]
# FD's bootstrap takes as many rounds at once as keep their counts (rounds x samples) and their
# covariances (rounds x dimension^2) each within this many float64s (256 MB): all 1,000 rounds of
# 22,000 samples of 64 features in one pass
FD_COUNTS = 2**25


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _fd_from_stats(stats_a: tuple[np.ndarray, np.ndarray], stats_b: tuple[np.ndarray, np.ndarray],
                   eps: float = 1e-6) -> float:
    """``cleanfid.fid.frechet_distance`` step for step (the same number, tested), without its
    ``sqrtm(..., disp=False)`` call, which fails on scipy >= 1.18."""
    from scipy import linalg

    (mu1, sigma1), (mu2, sigma2) = stats_a, stats_b
    mu1, mu2, sigma1, sigma2 = np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # a near-singular product: clean-fid's regularised retry
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Frechet distance between two feature sets, by clean-fid's formula.

    Callers check sample counts against the feature dimension where the
    user chooses them (params validation, the classifier stage); here too few
    samples are a bug.
    """
    if len(feats_a) <= feats_a.shape[1] or len(feats_b) <= feats_b.shape[1]:
        raise ValueError(
            f"Frechet distance needs more samples than feature dimensions ({feats_a.shape[1]}); "
            f"got {len(feats_a)} and {len(feats_b)}"
        )
    return _fd_from_stats(feature_stats(feats_a), feature_stats(feats_b))


class FrechetToReference:
    """FD of feature sets against one fixed reference, for the bootstrap's many replicates.

    The same quantity as :func:`frechet_distance`, by another route to its
    one costly term: with R the symmetric square root of the reference's
    covariance S2 (computed once), tr sqrt(S1 S2) = sum of sqrt(eigenvalues of
    R S1 R), a symmetric eigenproblem, where clean-fid takes a general matrix
    square root of S1 S2 (scipy's sqrtm: 20 ms at 64 dimensions against
    0.2 ms). The two agree to about 1e-9 relative (tests check 1e-8);
    reported FDs stay clean-fid's, only the bootstrap replicates take this.
    """

    def __init__(self, reference: np.ndarray):
        self.mu, sigma = feature_stats(reference)
        w, v = np.linalg.eigh(sigma)
        self.root = (v * np.sqrt(np.maximum(w, 0.0))) @ v.T
        self.trace = float(np.trace(sigma))

    def __call__(self, feats: np.ndarray) -> float:
        return float(self._fd(*feature_stats(feats)))

    def of_resamples(self, feats: np.ndarray, counts) -> np.ndarray:
        """FD of each resample of ``feats``, row b of ``counts`` holding how often resample b drew each sample.

        Equal to ``self(feats[idx])`` up to rounding (1.2e-9 relative at most on the default's samples,
        benchmarks/bootstrap_speed.py; tests check 1e-10 on small sets) without building a resample:
        each resample's mean and covariance are weighted sums over the samples. With more resamples
        than half the feature dimension, every feature pair's products are formed once and weighted by
        all rows of ``counts`` in one matrix product per feature; with fewer, each resample weights a
        copy of the features. Centring on the full set's mean first keeps the covariance free of
        cancellation.
        """
        n, dim = feats.shape
        centre = feats.mean(axis=0)
        x = feats - centre
        weights = np.asarray(counts, dtype=np.float64)
        mean = weights @ x / n
        if len(weights) > dim // 2:
            second = np.zeros((len(weights), dim, dim))
            for i in range(dim):
                second[:, i, i:] = weights @ (x[:, i:i + 1] * x[:, i:])
            second += np.triu(second, 1).transpose(0, 2, 1)
        else:
            second = np.stack([(x.T * w) @ x for w in weights])
        sigma = (second - n * mean[:, :, None] * mean[:, None, :]) / (n - 1)
        return self._fd(mean + centre, sigma)

    def _fd(self, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        """FD for a mean and covariance, or a stack of them (leading axis)."""
        diff = mu - self.mu
        eig = np.linalg.eigvalsh(self.root @ sigma @ self.root)
        return ((diff * diff).sum(axis=-1) + np.trace(sigma, axis1=-2, axis2=-1) + self.trace
                - 2.0 * np.sqrt(np.maximum(eig, 0.0)).sum(axis=-1))


def _cubic_kernel_sum(x: np.ndarray, y: np.ndarray, dim: int, skip_diagonal: bool = False) -> float:
    """Sum of the polynomial kernel (x . y / dim + 1)^3 over all pairs (the diagonal left out on request)."""
    k = x @ y.T
    k /= dim
    k += 1
    cube = k * k
    cube *= k  # numpy's ** 3 goes through pow(): three times slower than two multiplications
    total = float(cube.sum())
    return total - float(np.trace(cube)) if skip_diagonal else total


def kernel_distance(feats_a: np.ndarray, feats_b: np.ndarray, num_subsets: int, subset_size: int, seed: int,
                    workers: int = 1, b_sums: Optional[dict] = None) -> float:
    """KID (unbiased MMD^2, cubic polynomial kernel): clean-fid's estimator, subset draws and seed handling.

    The same number as ``cleanfid.fid.kernel_distance`` after ``np.random.seed(seed)`` (tests check it),
    computed twice as fast and without touching numpy's global random state. ``workers`` threads
    compute the subsets' terms, which are summed in draw order: the same number for any ``workers``.

    ``b_sums``: a dict kept by a caller that computes several KIDs against the same ``feats_b`` (the
    bootstrap: every replicate draws the same reference subsets, since the draws depend only on the
    seed and the sizes). It holds ``feats_b``'s within-subset kernel sums by subset, each computed once;
    the numbers are the same as without it.
    """
    rng = np.random.RandomState(seed)  # the draws of np.random.choice after np.random.seed(seed)
    dim = feats_a.shape[1]
    m = min(len(feats_a), len(feats_b), subset_size)
    draws = [(rng.choice(len(feats_b), m, replace=False), rng.choice(len(feats_a), m, replace=False))
             for _ in range(num_subsets)]

    def b_sum(x: np.ndarray, idx: np.ndarray) -> float:
        if b_sums is None:
            return _cubic_kernel_sum(x, x, dim, skip_diagonal=True)
        key = idx.tobytes()
        if key not in b_sums:
            b_sums[key] = _cubic_kernel_sum(x, x, dim, skip_diagonal=True)
        return b_sums[key]

    def term(draw: tuple[np.ndarray, np.ndarray]) -> float:
        x, y = feats_b[draw[0]], feats_a[draw[1]]
        within = b_sum(x, draw[0]) + _cubic_kernel_sum(y, y, dim, skip_diagonal=True)
        return within / (m - 1) - _cubic_kernel_sum(x, y, dim) * 2 / m

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            terms = list(pool.map(term, draws))
    else:
        terms = [term(d) for d in draws]
    total = 0.0
    for t in terms:  # plain left-to-right addition, as clean-fid's loop adds them (sum() is compensated on 3.12+)
        total += t
    return float(total / num_subsets / m)


def bootstrap_ci(feats: np.ndarray, reference: np.ndarray, statistic: Statistic, rounds: int, seed: int,
                 estimate: float, level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval of ``statistic(feats, reference)`` over the generated samples.

    Resampling with replacement duplicates samples, which inflates FD and
    KID (both are biased upwards as the number of distinct samples falls), so
    the raw bootstrap distribution sits above the estimate. The interval is
    therefore the bootstrap distribution's percentile spread placed around the
    reported ``estimate``: ``estimate + quantiles(boot - mean(boot))``. The
    statistic inside the bootstrap may be a cheaper variant of the reported
    one (KID on fewer subsets); the interval still surrounds what is reported.
    """
    return centred_percentile_ci(bootstrap_replicates(feats, reference, statistic, rounds, seed), estimate, level)


def bootstrap_workers() -> int:
    """Threads for bootstrap replicates: numpy and LAPACK release the GIL, so two cores run two replicates at once.

    At most the process's thread share (dtm_core.distributed.thread_share: ``DTM_THREADS``, or a launch's
    share of the cores), its cores, and 4.
    """
    from .distributed import thread_share  # imports torch, which every caller has loaded already

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, thread_share() or cores, 4))


def bootstrap_replicates(feats: np.ndarray, reference: np.ndarray, statistic: Statistic, rounds: int,
                         seed: int, chunk: int = 64) -> np.ndarray:
    """``statistic(feats[idx], reference)`` for ``rounds`` resamples idx drawn from ``seed``.

    The indices depend only on the seed, the round and ``len(feats)``: two
    models sampled from the same noise and resampled with the same seed are
    resampled with the same indices, so the difference of their replicates is
    the paired bootstrap of their difference (each model's replicates can be
    drawn once and shared by every contrast it enters).

    The indices are drawn in round order. FD's replicates are
    :meth:`FrechetToReference.of_resamples`', as many rounds at once as
    :data:`FD_COUNTS` allows: the reference's statistics and square root
    computed once, each resample's statistics from its counts. Any other
    statistic runs ``chunk`` rounds at a time on :func:`bootstrap_workers`
    threads, every replicate computed exactly as alone, so the result does not
    depend on the number of threads (tests check it).
    """
    n = len(feats)
    rng = np.random.default_rng(seed)
    if statistic is frechet_distance:
        to_reference = FrechetToReference(reference)
        step = max(1, FD_COUNTS // max(n, feats.shape[1] ** 2))
        return np.concatenate([np.empty(0)] + [
            to_reference.of_resamples(feats, np.stack([np.bincount(rng.integers(0, n, n), minlength=n)
                                                       for _ in range(min(step, rounds - start))], dtype=np.float64))
            for start in range(0, rounds, step)])
    out: list[float] = []
    with ThreadPoolExecutor(bootstrap_workers()) as pool:
        for start in range(0, rounds, chunk):
            draws = [rng.integers(0, n, n) for _ in range(min(chunk, rounds - start))]
            out.extend(pool.map(lambda idx: statistic(feats[idx], reference), draws))
    return np.array(out)


def centred_percentile_ci(boot: np.ndarray, estimate: float, level: float = 0.95) -> tuple[float, float]:
    """The replicates' percentile spread about their mean, placed around ``estimate`` (see bootstrap_ci)."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boot - boot.mean(), [tail, 100 - tail]) + estimate
    return float(low), float(high)


def paired_mean_ci(diff: np.ndarray, rounds: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of per-item paired differences ``diff``."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), (rounds, len(diff)))
    boot = diff[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return float(low), float(high)


def verdict(ci: list[float]) -> str:
    """A paired interval's reading: lower or higher when it excludes zero."""
    return "lower" if ci[1] < 0 else "higher" if ci[0] > 0 else "not distinguishable"


def _fd_replicates(model: dict, reference: np.ndarray, rounds: int, seed: int) -> np.ndarray:
    """The model's bootstrap FDs on the resamples of ``seed``; kept in ``model`` for its other contrasts."""
    cache = model.setdefault("fd_replicates", {})
    if (rounds, seed) not in cache:
        cache[rounds, seed] = bootstrap_replicates(model["features"], reference, frechet_distance, rounds, seed)
    return cache[rounds, seed]


def fd_contrast(a: dict, b: dict, reference: np.ndarray, rounds: int, seed: int) -> dict:
    """FD(a) - FD(b) with a paired bootstrap interval (same noise, same resampled indices).

    ``a`` and ``b`` hold their samples' ``features``; each model's bootstrap FDs
    are drawn once per (rounds, seed) and reused by every contrast it enters:
    one bootstrap per model instead of two per contrast.
    """
    delta = frechet_distance(a["features"], reference) - frechet_distance(b["features"], reference)
    boot = _fd_replicates(a, reference, rounds, seed) - _fd_replicates(b, reference, rounds, seed)
    ci = centred_percentile_ci(boot, delta)
    return {"fd": delta, "fd_ci": list(ci), "verdict": verdict(ci)}


def distances(feats: np.ndarray, reference: np.ndarray, kid_subsets: int, kid_subset_size: int,
              bootstrap_rounds: int, seed: int) -> dict:
    """FD and KID against the reference, each with a 95% bootstrap interval around the estimate.

    The KID inside the bootstrap uses a tenth of the subsets (at least 5) to
    keep the cost bounded; the point estimate uses all of them.
    """
    b_sums: dict = {}  # the reference's within-subset sums: the same subsets in every call below
    kid = lambda a, b, n=kid_subsets, w=1: kernel_distance(a, b, n, kid_subset_size, seed, w, b_sums)  # noqa: E731
    kid_boot = lambda a, b: kid(a, b, max(5, kid_subsets // 10))  # noqa: E731  (threads: one per replicate)
    fd, kd = frechet_distance(feats, reference), kid(feats, reference, w=bootstrap_workers())
    return {
        "fd": fd,
        "kid": kd,
        "fd_ci": list(bootstrap_ci(feats, reference, frechet_distance, bootstrap_rounds, seed, fd)),
        "kid_ci": list(bootstrap_ci(feats, reference, kid_boot, bootstrap_rounds, seed + 1, kd)),
    }


def check_fd_sample_count(count: int, feature_dim: int, what: str, fix: str) -> None:
    """A user-chosen sample count that cannot give a Frechet distance: say which and how to fix it."""
    if count <= feature_dim:
        raise ConfigError(
            f"{what} has {count} samples but the Frechet distance needs more than the feature dimension "
            f"({feature_dim}); {fix}"
        )


def class_coverage(probs: np.ndarray, class_freq: np.ndarray) -> dict:
    """Predicted-class histogram vs the real class frequencies: mode dropping and sharpness."""
    hist = np.bincount(probs.argmax(1), minlength=len(class_freq)) / len(probs)
    eps = 1e-6
    p, q = class_freq + eps, hist + eps
    return {
        "class_histogram": hist.tolist(),
        "class_tv_distance": float(0.5 * np.abs(hist - class_freq).sum()),
        "class_kl_divergence": float(np.sum(p / p.sum() * np.log((p / p.sum()) / (q / q.sum())))),
        "mean_confidence": float(probs.max(1).mean()),
    }


# ------------------------------------------------------------ memorisation
def nearest_distances(queries: np.ndarray, bank: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """Euclidean distance from every row of ``queries`` to its nearest row of ``bank`` (flattened)."""
    q = queries.reshape(len(queries), -1).astype(np.float64)
    b = bank.reshape(len(bank), -1).astype(np.float64)
    b_sq = (b**2).sum(axis=1)
    out = []
    for i in range(0, len(q), batch_size):
        chunk = q[i : i + batch_size]
        sq = (chunk**2).sum(axis=1)[:, None] + b_sq[None, :] - 2.0 * chunk @ b.T
        out.append(np.sqrt(np.maximum(sq.min(axis=1), 0.0)))
    return np.concatenate(out)


def memorisation(samples: np.ndarray, heldout: np.ndarray, train: np.ndarray, percentile: float) -> dict:
    """How many samples sit closer to a train image than real unseen images do.

    A held-out image is a fresh draw from the data distribution; its distance
    to the nearest train image says how close "new" data comes to the train
    set. A sample closer to some train image than the ``percentile``-th
    percentile of those held-out distances is counted as memorised: a model
    that copies its train set scores near 1, one that generalises near
    ``percentile`` / 100.
    """
    held_nn = nearest_distances(heldout, train)
    threshold = float(np.percentile(held_nn, percentile))
    sample_nn = nearest_distances(samples, train)
    return {
        "memorised_fraction": float((sample_nn < threshold).mean()),
        "threshold": threshold,
        "sample_nn_median": float(np.median(sample_nn)),
        "heldout_nn_median": float(np.median(held_nn)),
    }
