"""Balanced clustering of handwritten digits: otcore.nn.OTKMeans vs scikit-learn's KMeans.

scikit-learn's digits (1797 images of 8 x 8 pixels, ten classes of ~180 each) are projected on
their first 20 principal components and clustered into 10 groups, by plain k-means (Lloyd,
10 k-means++ starts) and by OTKMeans, whose assignments are balanced optimal transport: every
cluster gets 179 or 180 images. The script prints the adjusted Rand index (ARI) against the
true digits and the cluster sizes of each method over several seeds, and plots the sizes and a
2-D embedding (first two principal components) coloured by each method's labels.

Needs scikit-learn (``pip install scikit-learn``) for the data, PCA, KMeans and the ARI.
Run: ``python examples/ot_kmeans.py`` (about 4 s on one CPU core); saves ``examples/ot_kmeans.png``.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

from otcore.nn import OTKMeans

K, DIMS, SEEDS = 10, 20, 3


def main() -> None:
    digits = load_digits()
    x = PCA(DIMS, random_state=0).fit_transform(digits.data / 16.0)
    truth = digits.target
    runs = {"KMeans": [], "OTKMeans": []}
    for seed in range(SEEDS):
        runs["KMeans"].append(KMeans(K, n_init=10, random_state=seed).fit_predict(x))
        runs["OTKMeans"].append(OTKMeans(K, seed=seed).fit_predict(x))
    for name, labels in runs.items():
        scores = [adjusted_rand_score(truth, lab) for lab in labels]
        sizes = np.sort(np.bincount(labels[0], minlength=K))
        print(f"{name:9s} ARI {np.mean(scores):.3f} +- {np.std(scores):.3f} over {SEEDS} seeds; "
              f"sizes (seed 0) {sizes.tolist()}")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.4
    for shift, (name, labels) in zip((-width / 2, width / 2), runs.items(), strict=True):
        axes[0].bar(np.arange(K) + shift, np.sort(np.bincount(labels[0], minlength=K)), width, label=name)
    axes[0].axhline(len(truth) / K, color="k", lw=0.8, ls="--", label="n / k")
    axes[0].set(title="cluster sizes (sorted, seed 0)", xlabel="cluster rank", ylabel="images")
    axes[0].legend()
    for ax, (name, labels) in zip(axes[1:], runs.items(), strict=True):
        ax.scatter(x[:, 0], x[:, 1], c=labels[0], cmap="tab10", s=6)
        ax.set(title=f"{name}: ARI {adjusted_rand_score(truth, labels[0]):.3f}", xlabel="PC 1", ylabel="PC 2")
    fig.tight_layout()
    out = Path(os.environ.get("OTCORE_EXAMPLES_OUT", Path(__file__).parent)) / "ot_kmeans.png"
    fig.savefig(out, dpi=120)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
