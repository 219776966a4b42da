"""Relation distillation between teacher and student feature maps along a denoising trajectory.

Both losses compare *relation matrices* instead of raw features: per sample, the pixel features of the
last decoder stage are L2-normalised along the channel dim, their pairwise cosine similarities divided
by a temperature τ and turned into one probability distribution per row (row-softmax). The teacher's
distribution P_fp and the student's P_q are compared with KL(P_fp ‖ P_q), averaged over samples and rows.

- :class:`TimeSmoothedRelationLoss` — MPQ-DM's TRD (arXiv 2412.11549; official code
  ``OurDDIMSampler_trainer``): the features of N consecutive sampling steps are averaged before the
  relation matrix is formed (a smoothed target over a short window). The released code detaches the
  student's features, so there TRD never trains anything; here the student's features of the *current*
  step carry gradient. The earlier steps of the window were computed with parameters that have been
  updated since (one optimizer update per step), so they enter the average as constants (our choice;
  back-propagating into them would need the superseded parameters). The code applies the loss every
  N-th step on non-overlapping windows; so do we.
- :class:`MemoryRelationLoss` — MPQ-DMv2's memory-based temporal relation distillation (MTRD;
  arXiv 2507.04290, abstract only: "an online time-aware pixel queue for long-term denoising temporal
  information distillation"; no public code). Our design [INFER], in the spirit of memory-bank
  relational distillation (CIRKD, Yang et al., CVPR 2022, from background knowledge — a pixel queue of
  *teacher* embeddings that teacher and student queries are both related to): the memory holds the L2-normalised teacher pixel embeddings ([P, C] per image, detached) of past
  images and past steps — across trajectories and hence across QAT updates — in one FIFO bucket per
  sampling timestep, ``memory_length`` images per bucket ("time-aware": an image at timestep t is only
  related to what the teacher produced at the same t, whose feature statistics are comparable). At a step,
  sample i (timestep t_i; a batch may mix timesteps) is compared on
    * its own pixels (the in-image relation, weight 1): row-softmax(F·Fᵀ/τ) of the teacher vs the student,
    * every entry m of bucket(t_i): R_m = row-softmax(F_now · M_mᵀ / τ), with the teacher's and the student's
      current pixels as queries against the *same* teacher keys M_m, weight decay^age (newest age 1),
  loss_i = Σ_w w·KL(R^fp ‖ R^q) / Σ_w w, averaged over the batch. After the loss the batch's teacher
  embeddings are enqueued into their buckets (in sample order), so an image is never related to itself
  and the first trajectory only has the in-image term. With M = 0 it is the per-step relation loss.
  Choices where the paper is silent: one bucket per exact sampler timestep (the QAT trajectories all use
  the same schedule, so 20 steps -> 20 buckets; no timestep grouping); the student side of the queue is not
  stored (queued student features would come from superseded parameters); no in-batch cross-image term.
  The memory survives :meth:`MemoryRelationLoss.start_trajectory` (called per trajectory batch) and is
  emptied only by ``reset``.

Features are [B, C, H, W] maps (UNet: pixels = H·W, channels = C) or [B, N, D] token sequences (DiT /
PixArt: pixels = tokens, channels = D).
"""
from __future__ import annotations

from collections import deque
from typing import Optional

import torch
import torch.nn.functional as F


def pixel_features(features: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H·W, C]; [B, N, D] stays; other ranks raise ValueError."""
    if features.dim() == 4:
        return features.flatten(2).transpose(1, 2)
    if features.dim() == 3:
        return features
    raise ValueError(f"features: expected [B, C, H, W] feature maps or [B, N, D] tokens, got shape "
                     f"{tuple(features.shape)}")


def normalized_pixels(features: torch.Tensor) -> torch.Tensor:
    """Pixel features [B, P, C], L2-normalised along C (float32)."""
    return F.normalize(pixel_features(features).float(), dim=-1, eps=1e-8)


def relation_log_probs(query: torch.Tensor, keys: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log row-softmax(query · keysᵀ / τ): [B, P, C] x [B, K, C] -> [B, P, K] (inputs already normalised)."""
    return torch.log_softmax(query @ keys.transpose(1, 2) / temperature, dim=-1)


def relation_kl(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor, reduce: bool = True) -> torch.Tensor:
    """KL(P_fp ‖ P_q) per row, averaged over samples and rows (``reduce=False``: averaged over rows only, [B])."""
    p = teacher_log_probs.exp()
    kl = (p * (teacher_log_probs - student_log_probs)).sum(-1)
    return kl.mean() if reduce else kl.mean(-1)


def relation_loss(teacher_features: torch.Tensor, student_features: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """Single-step relation distillation: KL between the pixel-to-pixel relation matrices."""
    _check_pair(teacher_features, student_features)
    ft = normalized_pixels(teacher_features.detach())
    fs = normalized_pixels(student_features)
    return relation_kl(relation_log_probs(ft, ft, temperature), relation_log_probs(fs, fs, temperature))


def _check_pair(teacher_features: torch.Tensor, student_features: torch.Tensor) -> None:
    if teacher_features.shape != student_features.shape:
        raise ValueError(f"teacher and student features must have the same shape, got "
                         f"{tuple(teacher_features.shape)} and {tuple(student_features.shape)}")


def _check_temperature(temperature) -> float:
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature <= 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    return float(temperature)


class TimeSmoothedRelationLoss:
    """MPQ-DM TRD: relation KL of features averaged over ``window`` consecutive steps (see module doc).

    Call once per sampling step; returns the loss on the step that completes a window, else None.
    """

    kind = "trd"

    def __init__(self, window: int = 2, temperature: float = 1.0):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1 (consecutive steps averaged), got {window!r}")
        self.window = window
        self.temperature = _check_temperature(temperature)
        self._teacher: list = []
        self._student: list = []
        self._last_t: Optional[float] = None

    def reset(self) -> None:
        self._teacher, self._student, self._last_t = [], [], None

    def start_trajectory(self) -> None:
        """A new trajectory batch starts: windows never straddle two."""
        self.reset()

    def __call__(self, timestep, teacher_features: torch.Tensor,
                 student_features: torch.Tensor) -> Optional[torch.Tensor]:
        _check_pair(teacher_features, student_features)
        t = float(torch.as_tensor(timestep).float().reshape(-1)[0])
        stale_batch = bool(self._teacher) and self._teacher[0].shape != teacher_features.shape
        if self._last_t is not None and (t >= self._last_t or stale_batch):
            self.reset()  # a new trajectory: windows never straddle two
        self._last_t = t
        # earlier steps of the window are constants (their parameters have been updated since)
        self._student = [s.detach() for s in self._student]
        self._teacher.append(teacher_features.detach())
        self._student.append(student_features)
        if len(self._teacher) < self.window:
            return None
        ft = torch.stack(self._teacher).mean(0)
        fs = torch.stack(self._student).mean(0)
        self._teacher, self._student = [], []
        return relation_loss(ft, fs, self.temperature)


class MemoryRelationLoss:
    """MPQ-DMv2 MTRD: relation KL of the current pixels against a time-aware memory of *teacher* pixel
    embeddings from earlier trajectories (past images, past QAT updates), one FIFO bucket of
    ``memory_length`` entries per sampling timestep (see module doc). Call once per sampling step with the
    batch's timesteps ([B] or a scalar; a batch may mix timesteps); returns the loss of that step
    (never None). The memory persists across trajectories: :meth:`start_trajectory` keeps it,
    :meth:`reset` empties it."""

    kind = "memory"

    def __init__(self, memory_length: int = 4, temperature: float = 1.0, decay: float = 1.0):
        if isinstance(memory_length, bool) or not isinstance(memory_length, int) or memory_length < 0:
            raise ValueError(f"memory_length must be an int >= 0 (entries per timestep bucket), got {memory_length!r}")
        if not isinstance(decay, (int, float)) or not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1] (weight of an entry = decay ** age), got {decay!r}")
        self.memory_length = memory_length
        self.temperature = _check_temperature(temperature)
        self.decay = float(decay)
        self.buckets: dict = {}  # timestep (int) -> deque of [P, C] teacher embeddings, oldest first

    def reset(self) -> None:
        self.buckets = {}

    def start_trajectory(self) -> None:
        """A new trajectory batch starts: the memory is kept (it is long-term by design)."""

    @staticmethod
    def bucket_key(t) -> int:
        """The bucket of a timestep: the integer sampler timestep (one bucket per sampling step)."""
        return int(round(float(t)))

    def bucket(self, t) -> list:
        """Entries ([P, C] teacher embeddings) of the bucket of timestep ``t``, oldest first."""
        return list(self.buckets.get(self.bucket_key(t), ()))

    @property
    def timesteps(self) -> list:
        """Bucket keys that hold entries, in ascending order."""
        return sorted(k for k, v in self.buckets.items() if len(v))

    def _per_sample_timesteps(self, timestep, batch: int) -> list:
        t = torch.as_tensor(timestep).detach().reshape(-1).cpu()
        if t.numel() == 1:
            return [self.bucket_key(t[0])] * batch
        if t.numel() != batch:
            raise ValueError(f"timestep: expected a scalar or one timestep per sample ({batch}), got {t.numel()}")
        return [self.bucket_key(v) for v in t]

    def __call__(self, timestep, teacher_features: torch.Tensor, student_features: torch.Tensor) -> torch.Tensor:
        _check_pair(teacher_features, student_features)
        ft = normalized_pixels(teacher_features.detach())
        fs = normalized_pixels(student_features)
        keys = self._per_sample_timesteps(timestep, ft.shape[0])
        for k in set(keys):
            entries = self.buckets.get(k)
            if entries and entries[0].shape != ft.shape[1:]:
                raise ValueError(f"memory bucket of timestep {k} holds embeddings of shape {tuple(entries[0].shape)}, "
                                 f"the current features give {tuple(ft.shape[1:])} (one model per memory)")
        # the in-image relation (current step, teacher vs student on their own pixels), weight 1
        self_kl = relation_kl(relation_log_probs(ft, ft, self.temperature), relation_log_probs(fs, fs, self.temperature),
                              reduce=False)  # [B]
        groups: dict = {}  # bucket -> sample indices, in order of first appearance (deterministic)
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        total = None
        for k, idx in groups.items():
            idx_t = torch.tensor(idx, device=ft.device)
            part = self_kl.index_select(0, idx_t)
            mem = self.buckets.get(k)
            if mem:
                m = torch.stack(list(mem)).to(ft.device)  # [n, P, C], oldest first
                n = m.shape[0]
                w = torch.tensor([self.decay ** age for age in range(n, 0, -1)], device=ft.device)  # newest: age 1
                lt = torch.log_softmax(torch.einsum("bpc,nqc->bnpq", ft.index_select(0, idx_t), m)
                                       / self.temperature, dim=-1)
                ls = torch.log_softmax(torch.einsum("bpc,nqc->bnpq", fs.index_select(0, idx_t), m)
                                       / self.temperature, dim=-1)
                kl = relation_kl(lt, ls, reduce=False)  # [b, n]
                part = (part + (kl * w).sum(1)) / (1.0 + float(w.sum()))
            total = part.sum() if total is None else total + part.sum()
        loss = total / ft.shape[0]
        if self.memory_length > 0:  # enqueue after the loss: an image is never related to itself
            for i, k in enumerate(keys):
                q = self.buckets.setdefault(k, deque(maxlen=self.memory_length))
                q.append(ft[i].detach().clone())
        return loss


def build_relation_loss(kind: str, window: int = 2, memory_length: int = 4, temperature: float = 1.0,
                        decay: float = 1.0):
    """"trd" -> TimeSmoothedRelationLoss, "memory" -> MemoryRelationLoss, "none" -> None."""
    if kind == "trd":
        return TimeSmoothedRelationLoss(window, temperature)
    if kind == "memory":
        return MemoryRelationLoss(memory_length, temperature, decay)
    if kind == "none":
        return None
    raise ValueError(f"relation kind must be one of ['trd', 'memory', 'none'], got {kind!r}")
