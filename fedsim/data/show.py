"""Picture of a multi-domain dataset: one row per domain, one column per class.

Looking at samples is the quickest check that a loader produced what was intended (the
right domain styles, legible digits, labels that match the images), so ``fedsim data
show`` renders this grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedsim.data.base import MultiDomainDataset
from fedsim.outputs import PNG_SOFTWARE


def _pick(labels: np.ndarray, count: int, num_classes: int) -> list[int]:
    """Indices of ``count`` samples cycling through the classes 0, 1, ..., taking each
    class's samples in dataset order (first one first), so the grid is deterministic."""
    by_class = [np.flatnonzero(labels == c).tolist() for c in range(num_classes)]
    picked: list[int] = []
    used = [0] * num_classes
    cls = 0
    misses = 0
    while len(picked) < count and misses < num_classes:
        if used[cls] < len(by_class[cls]):
            picked.append(by_class[cls][used[cls]])
            used[cls] += 1
            misses = 0
        else:
            misses += 1
        cls = (cls + 1) % num_classes
    return picked


def save_domain_grid(dataset: MultiDomainDataset, path: str | Path, per_domain: int = 10, split: str = "train") -> Path:
    """Save a PNG grid of ``per_domain`` samples (one per class, cycling) for every domain.

    Rows are labelled with the domain name, every tile with its class name. Uses
    matplotlib's Agg canvas directly (no pyplot), so it works headless and leaves no global
    figure state behind. Returns the written path.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
    if per_domain < 1:
        raise ValueError(f"per_domain must be >= 1 (got {per_domain})")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(dataset.domains)
    if not names:
        raise ValueError(f"dataset '{dataset.name}' has no domains to show")
    class_names = dataset.class_names or [str(c) for c in range(dataset.num_classes)]
    tile = 0.9  # inches per image
    fig = Figure(figsize=(1.2 + tile * per_domain, 0.6 + tile * len(names)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), per_domain, squeeze=False)
    for row, name in enumerate(names):
        part = dataset.domains[name]
        x = part.x_train if split == "train" else part.x_test
        y = np.asarray(part.y_train if split == "train" else part.y_test)
        picked = _pick(y, per_domain, dataset.num_classes)
        for col in range(per_domain):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if col < len(picked):
                image = np.asarray(x[picked[col]])
                if image.shape[-1] == 1:
                    ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                else:
                    ax.imshow(image, interpolation="nearest")
                ax.set_title(class_names[int(y[picked[col]])], fontsize=8, pad=2)
            if col == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=10, labelpad=8)
    fig.suptitle(f"{dataset.name} ({split})", fontsize=10)
    # Margins in inches, converted to figure fractions: room for row labels and the title.
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=1.1 / width, right=0.99, top=1 - 0.45 / height, bottom=0.02, wspace=0.08, hspace=0.35)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", metadata={"Software": PNG_SOFTWARE})  # lets --overwrite prove it is ours
    return out
