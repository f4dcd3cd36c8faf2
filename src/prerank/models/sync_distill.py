"""Synchronous distillation: a teacher and a student trained jointly on shared embeddings.

Source: the Taobao coarse-ranking report (``../shared/papers/taobao-coarse-ranking-distillation.txt``),
"Further analysis": "Synchronous distillation (teacher and student trained jointly) showed mixed results;
disabling student updates to the shared embedding improved performance, while allowing the teacher to
update user-attention gave the best gains." The report gives nothing more (no loss, no architecture).
The setting is Rocket Launching's (Zhou et al., AAAI 2018): a light net and a booster net trained at
once on shared lower layers, the light net also fitting the booster's logits, with a "gradient block"
that stops the light net's losses from moving what it shares with the booster.

Readings written down here:

- **Shared** means one :class:`~prerank.layers.embedding.EmbeddingTables` object: the student's ``emb`` is
  replaced by the teacher's, so a feature has one table that both models read. The student and the
  teacher must therefore embed at the same width ``D`` and the teacher's tables must cover every feature
  the student reads (the ranker reads every feature, so it does); anything else is a :class:`ConfigError`.
  The towers, heads and attention stay each model's own.
- **Loss** (Rocket Launching Eq. 1, with the report's pointwise soft labels in place of its L2 hint):
  ``L = BCE(z_s, y) + BCE(z_t, y) + w * BCE(z_s / T, sigmoid(z_t / T))``, the teacher logit detached in the
  last term so the student never pulls the teacher towards itself. The student's hard BCE is the
  trainer's loss; the other two terms are this model's :meth:`SyncDistill.auxiliary_loss`.
- **Student gradients into the shared embeddings** (``student_updates_embeddings``): off, the student reads
  the tables through :class:`GradientBlock` (lookups detached), so both student terms update only the
  student's own layers and the embeddings learn from the teacher's loss alone (the report's better
  variant; Rocket Launching's gradient block).
- **Teacher allowed to update the user attention** (``teacher_updates_attention``): the user attention is
  the teacher's attention over the behaviour sequence (``attention``: the ranker's DIN units); off, those
  parameters are frozen (``requires_grad=False``) at their starting values, which is meaningful when the
  teacher starts from a trained checkpoint (``prerank distill sync --teacher-init CKPT``). Another reading
  of the report's sentence is that a user attention shared by both models receives the teacher's gradient
  or not; the student's NOVA self-attention and the ranker's DIN target attention are different functions
  and cannot be one module, so that reading is not built.

Serving: ``encode_user`` / ``encode_item`` / ``score`` are the student's, so the joint model exports and
caches like any student (its graphs read only the student's weights); the teacher is a training-time
passenger. :func:`prerank.train.sync_distill.student_model` extracts the student as a plain model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from prerank.data.batch import Batch
from prerank.layers.embedding import EmbeddingTables
from prerank.losses.pointwise import binary_cross_entropy
from prerank.models.base import ConfigError, PreRanker, State
from prerank.schema import Schema


class GradientBlock(nn.Module):
    """A read-only view of shared embedding tables: the same lookups, detached from the graph.

    Gives the student the :class:`EmbeddingTables` methods it calls (``field``, ``fields``, ``sequence``,
    ``lookup``); no gradient reaches the tables through it. Shapes as :class:`EmbeddingTables`.
    """

    def __init__(self, inner: EmbeddingTables):
        super().__init__()
        self.inner = inner
        self.dim = inner.dim

    def field(self, batch: Batch, name: str) -> Tensor:
        return self.inner.field(batch, name).detach()

    def fields(self, batch: Batch, names: tuple[str, ...] | list[str]) -> Tensor:
        return self.inner.fields(batch, names).detach()

    def sequence(self, batch: Batch, name: str) -> tuple[Tensor, Tensor]:
        emb, mask = self.inner.sequence(batch, name)
        return emb.detach(), mask

    def lookup(self, table: str, ids: Tensor) -> Tensor:
        return self.inner.lookup(table, ids).detach()


@dataclass(frozen=True)
class SyncDistillConfig:
    """Options of :class:`SyncDistill`.

    Attributes:
        student: registered model served after training (it must have an ``emb`` of EmbeddingTables).
        teacher: registered model trained beside it (default the ``ranker``).
        student_options / teacher_options: their config overrides; embedding widths must agree.
        student_updates_embeddings: whether the student's losses update the shared embeddings.
        teacher_updates_attention: whether the teacher's user-attention parameters train.
        attention: the teacher's submodules that form its user attention (the ranker's ``attention``).
        distill_weight: ``w``, weight of the soft-label term.
        temperature: ``T`` of the soft labels.
    """

    student: str = "distilled_dssm"
    teacher: str = "ranker"
    student_options: dict = field(default_factory=dict)
    teacher_options: dict = field(default_factory=dict)
    student_updates_embeddings: bool = True
    teacher_updates_attention: bool = True
    attention: tuple[str, ...] = ("attention",)
    distill_weight: float = 1.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.student == "sync_distill" or self.teacher == "sync_distill":
            raise ConfigError("sync_distill cannot nest itself as student or teacher")
        for name in ("student_updates_embeddings", "teacher_updates_attention"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"sync_distill option {name} must be true or false, got {getattr(self, name)!r}")
        if not self.distill_weight >= 0:
            raise ConfigError(f"distill_weight must be >= 0, got {self.distill_weight!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")


class SyncDistill(PreRanker):
    """Teacher and student on one set of embedding tables; scores with the student (see the module docstring)."""

    def __init__(self, schema: Schema, config: SyncDistillConfig = SyncDistillConfig()):
        super().__init__(schema)
        from prerank.models.registry import build_model  # the registry imports this module

        self.config = config
        self.teacher = build_model(config.teacher, schema, config.teacher_options)
        self.student = build_model(config.student, schema, config.student_options)
        shared = self._shared_tables()
        self.student.emb = shared if config.student_updates_embeddings else GradientBlock(shared)
        for name in config.attention:
            try:
                module = self.teacher.get_submodule(name)
            except AttributeError:
                raise ConfigError(f"teacher {config.teacher!r} has no submodule {name!r} (option attention)") from None
            module.requires_grad_(config.teacher_updates_attention)

    def _shared_tables(self) -> EmbeddingTables:
        teacher, student = getattr(self.teacher, "emb", None), getattr(self.student, "emb", None)
        if not isinstance(teacher, EmbeddingTables) or not isinstance(student, EmbeddingTables):
            raise ConfigError("synchronous distillation needs a teacher and a student that embed with EmbeddingTables")
        if teacher.dim != student.dim:
            raise ConfigError(
                f"shared embeddings need one width: the teacher embeds at {teacher.dim}, the student at "
                f"{student.dim} (set embedding_dim in teacher_options or student_options)"
            )
        missing = sorted(set(student.names) - set(teacher.names))
        if missing:
            raise ConfigError(f"the teacher does not embed the student's features {missing}, so cannot share them")
        return teacher

    def encode_user(self, batch: Batch) -> State:
        return self.student.encode_user(batch)

    def encode_item(self, batch: Batch) -> State:
        return self.student.encode_item(batch)

    def score(self, user: State, item: State, pair: Batch | None = None) -> Tensor:
        return self.student.score(user, item, pair)

    def teacher_terms(self, batch: Batch, student_logits: Tensor) -> tuple[Tensor, Tensor]:
        """``BCE(z_t, y)`` and ``BCE(z_s / T, sigmoid(z_t / T))`` (teacher detached) on a row batch ``[B]``."""
        if batch.label is None:
            raise ValueError("synchronous distillation needs batch.label (the teacher trains on the hard labels)")
        teacher_logits = self.teacher(batch)
        hard = binary_cross_entropy(teacher_logits, batch.label)
        t = self.config.temperature
        soft = binary_cross_entropy(student_logits / t, torch.sigmoid(teacher_logits.detach() / t))
        return hard, soft

    def auxiliary_loss(self, batch: Batch, user: State, item: State) -> Tensor:
        """The teacher's hard loss plus ``w`` x the student's soft-label loss (the trainer adds the student's BCE)."""
        student_aux = self.student.auxiliary_loss(batch, user, item)
        hard, soft = self.teacher_terms(batch, self.score(user, item, batch))
        loss = hard + self.config.distill_weight * soft
        return loss if student_aux is None else loss + student_aux
