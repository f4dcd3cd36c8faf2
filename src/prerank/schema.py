"""Feature schema: what every column of a prerank dataset means.

A dataset on disk is Parquet plus ``schema.json`` (see DESIGN.md "Data"). Each feature says which
tower it belongs to, what kind it is, its vocabulary and, for FSCD, its cost type
(FSCD paper, Table 1: type I-IV with operation cost ``o_j``, plus ``e_j`` embedding width and
``n_j`` number of values).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

Tower = Literal["user", "item", "context", "cross"]
Kind = Literal["categorical", "sequence", "dense"]
Pooling = Literal["mean", "sum", "none"]
CostType = Literal["I", "II", "III", "IV"]

TOWERS: tuple[str, ...] = ("user", "item", "context", "cross")
KINDS: tuple[str, ...] = ("categorical", "sequence", "dense")
POOLINGS: tuple[str, ...] = ("mean", "sum", "none")

#: FSCD Table 1: the online computational cost ``o_j`` of each feature type.
#: I: simple query/user features that directly look up embeddings (0.4);
#: II: simple item-correlated features (1.5); III: complex query/user features (1.0), e.g.
#: statistics or behaviour sequences of the user; IV: complex item-correlated features that require
#: complicated computations (3.0), e.g. user-item cross features and item statistics joined online.
#: (The extracted paper text is garbled; this reading keeps its two axes, simple/complex x
#: user/item, and its four values.)
COST_O: dict[str, float] = {"I": 0.4, "II": 1.5, "III": 1.0, "IV": 3.0}

#: Columns with a fixed meaning; they are never features.
RESERVED: tuple[str, ...] = (
    "request_id",
    "label",
    "label_level",
    "stage",
    "teacher_logit",
    "ts",
)

#: Values of the ``stage`` column (DESIGN.md "The cascade"), encoded as int8 on disk.
STAGES: tuple[str, ...] = ("impression", "rank_candidate", "prerank_candidate", "random")


class SchemaError(ValueError):
    """The schema is malformed or does not match the data."""


@dataclass(frozen=True)
class FeatureSpec:
    """One feature column.

    Attributes:
        name: column name in the Parquet files.
        tower: ``user`` and ``context`` features are known once per request, ``item`` features are
            cacheable per item, ``cross`` features depend on the (user, item) pair.
        kind: ``categorical`` (int id, 0 = padding/unknown), ``sequence`` (list of ids, e.g. a
            behaviour sequence) or ``dense`` (float).
        vocab_size: number of ids including 0; ids must lie in ``[0, vocab_size)``.
        embedding_dim: suggested embedding width (models may override it with one shared width).
        max_len: sequences are truncated to their last ``max_len`` ids.
        pooling: how a sequence becomes one vector when a model does not attend over it.
        shares: name of a categorical feature whose embedding table this one reuses
            (a behaviour sequence of item ids shares ``item_id``'s table).
        cost_type: FSCD Table 1 type I-IV; ``o_j`` is :data:`COST_O` of it.
        n_values: FSCD ``n_j``, the number of values the feature holds per sample.
    """

    name: str
    tower: Tower
    kind: Kind
    vocab_size: int = 0
    embedding_dim: int = 16
    max_len: int = 0
    pooling: Pooling = "mean"
    shares: str | None = None
    cost_type: CostType = "I"
    n_values: int = 1
    description: str = ""

    def __post_init__(self) -> None:
        if not self.name or self.name in RESERVED:
            raise SchemaError(f"feature name {self.name!r} is empty or reserved")
        if self.tower not in TOWERS:
            raise SchemaError(f"feature {self.name!r}: tower must be one of {TOWERS}, got {self.tower!r}")
        if self.kind not in KINDS:
            raise SchemaError(f"feature {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind != "dense" and self.vocab_size < 2 and self.shares is None:
            raise SchemaError(f"feature {self.name!r}: vocab_size must be >= 2 (0 is padding)")
        if self.kind == "sequence" and self.max_len < 1:
            raise SchemaError(f"feature {self.name!r}: a sequence needs max_len >= 1")
        if self.pooling not in POOLINGS:
            raise SchemaError(f"feature {self.name!r}: pooling must be one of {POOLINGS}")
        if self.cost_type not in COST_O:
            raise SchemaError(f"feature {self.name!r}: cost_type must be one of {tuple(COST_O)}")
        if self.embedding_dim < 1:
            raise SchemaError(f"feature {self.name!r}: embedding_dim must be >= 1")

    @property
    def cost_o(self) -> float:
        """FSCD operation cost ``o_j`` of this feature's type."""
        return COST_O[self.cost_type]

    @property
    def table(self) -> str:
        """Name of the embedding table this feature looks up."""
        return self.shares or self.name


@dataclass(frozen=True)
class Schema:
    """All features of a dataset plus which optional reserved columns it carries."""

    features: tuple[FeatureSpec, ...]
    has_label_level: bool = False
    has_teacher_logit: bool = False
    has_stage: bool = False
    name: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise SchemaError(f"duplicate feature names in schema: {names}")
        by_name = {f.name: f for f in self.features}
        for f in self.features:
            if f.shares is not None:
                target = by_name.get(f.shares)
                if target is None or target.kind != "categorical":
                    raise SchemaError(f"feature {f.name!r} shares {f.shares!r}, which is not a categorical feature")
                if f.vocab_size not in (0, target.vocab_size):
                    raise SchemaError(f"feature {f.name!r} shares {f.shares!r} but has a different vocab_size")

    def __getitem__(self, name: str) -> FeatureSpec:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no feature {name!r} in schema (have {[f.name for f in self.features]})")

    def __contains__(self, name: object) -> bool:
        return any(f.name == name for f in self.features)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def tower(self, *towers: str) -> tuple[FeatureSpec, ...]:
        """Features of the given towers, in schema order."""
        return tuple(f for f in self.features if f.tower in towers)

    def vocab(self, name: str) -> int:
        """Vocabulary size of a feature, following ``shares``."""
        f = self[name]
        return self[f.shares].vocab_size if f.shares else f.vocab_size

    def with_reserved(self, **flags: bool) -> Schema:
        """Copy with ``has_label_level`` / ``has_teacher_logit`` / ``has_stage`` changed."""
        return replace(self, **flags)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "features": [asdict(f) for f in self.features],
            "has_label_level": self.has_label_level,
            "has_teacher_logit": self.has_teacher_logit,
            "has_stage": self.has_stage,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Schema:
        if not isinstance(d, dict) or not isinstance(d.get("features"), list):
            raise SchemaError("schema must be an object with a 'features' list")
        known = set(FeatureSpec.__dataclass_fields__)
        feats = []
        for i, raw in enumerate(d["features"]):
            if not isinstance(raw, dict):
                raise SchemaError(f"schema feature #{i} is not an object")
            unknown = set(raw) - known
            if unknown:
                raise SchemaError(f"schema feature #{i} ({raw.get('name')!r}) has unknown keys {sorted(unknown)}")
            missing = {"name", "tower", "kind"} - set(raw)
            if missing:
                raise SchemaError(f"schema feature #{i} lacks {sorted(missing)}")
            feats.append(FeatureSpec(**raw))
        return cls(
            features=tuple(feats),
            has_label_level=bool(d.get("has_label_level", False)),
            has_teacher_logit=bool(d.get("has_teacher_logit", False)),
            has_stage=bool(d.get("has_stage", False)),
            name=str(d.get("name", "")),
            extra=dict(d.get("extra", {})),
        )

    def save(self, path: str | Path) -> None:
        from prerank.io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Schema:
        path = Path(path)
        if path.is_dir():
            path = path / "schema.json"
        elif path.is_file() and path.suffix != ".json":
            raise SchemaError(f"{path} is a file, not a dataset directory (schema.json, train/, valid/, test/)")
        if not path.exists():
            raise SchemaError(f"no schema.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(d)
