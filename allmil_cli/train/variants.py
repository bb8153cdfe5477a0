"""The embedders of the ablation (``embedder_ablation.py``) and a ``Protocol2`` whose features come from one of them.

Kept apart from the ablation's commands so that ``heldout`` and ``protocol4`` can take a variant without importing the
ablation (which imports them).
"""

from __future__ import annotations

from allmil_cli.train.inventory import PBC_TRAIN, inventory, pbc_cells
from allmil_cli.train.protocol2 import Protocol2, fields

#: name -> (backbone spec, input side in px)
VARIANTS: dict[str, tuple[str, int]] = {
    "in224": ("mobilenet_v2:center", 224),
    "in160": ("mobilenet_v2:center", 160),
    "in128": ("mobilenet_v2:center", 128),
    "lite0": ("efficientnet_lite0:center", 224),
}
BASELINE = "in224"


def variant(name: str) -> tuple[str, int]:
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


class VariantProtocol2(Protocol2):
    """``Protocol2`` (ground-truth cells) whose features come from a variant's embedder input; its fold models' cache
    key carries the variant, so they never mix with the shipped recipe's."""

    def __init__(self, name: str, recipe: str = "v2pbc", verbose: bool = True):
        from allmil_cli.train.augment import RECIPES
        from allmil_cli.train.features import feature_cache
        from allmil_cli.train.mil import TrainConfig

        backbone, size = variant(name)
        self.variant, self.input_size = name, size
        self.recipe = RECIPES[recipe]
        self.recs, self.folds = fields()
        self.by_name = {r.name: r for r in self.recs}
        self.fold_of = {r.name: f for r, f in zip(self.recs, self.folds)}
        self.cells = inventory() + (pbc_cells(per_type=PBC_TRAIN) if self.recipe.pbc else [])
        self.fc = feature_cache(backbone, self.recipe.n_aug, self.cells, recipe=self.recipe, input_size=size)
        self.backbone, self.n_aug, self.cfg = backbone, self.recipe.n_aug, TrainConfig()
        self.source, self.det_paths, self.protocol, self.view_subset = "gt", None, 2, None
        self.models, self.verbose, self._det = {}, verbose, {}
        self.idx_of_field: dict[str, list[int]] = {}
        for i, c in enumerate(self.cells):
            if c.idb1_field and c.kind in ("idb1", "idb2"):
                self.idx_of_field.setdefault(c.idb1_field, []).append(i)

    def key(self, fold: int) -> dict:
        key = super().key(fold)
        return key if self.variant == BASELINE else {**key, "input_size": self.input_size}


def protocol2_for(recipe: str, name: str | None, verbose: bool = True) -> Protocol2:
    if name is None or name == BASELINE:
        return Protocol2(cells_source="gt", recipe=recipe, verbose=verbose)
    return VariantProtocol2(name, recipe, verbose)
