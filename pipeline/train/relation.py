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
  information distillation"; no public code). Our design [INFER]: a FIFO queue holding the normalised
  pixel features of the last M steps of the *same* trajectories (teacher's and student's, detached,
  each entry tagged with its timestep). At every step the current pixels are related to the pixels of
  every memory entry and of the current step: R_m = row-softmax(F_now · F_mᵀ / τ) per entry m, for the
  teacher (its own memory) and the student (its own memory); the loss is the weighted mean over entries
  of KL(R_m^fp ‖ R_m^q), weight decay^age (1 = uniform). With M = 0 it is the per-step relation loss.
  Time-aware: each entry keeps its timestep; the queue is emptied when the timestep does not decrease
  (a new trajectory started: supervision never mixes trajectories) or the batch changes.

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


def relation_kl(teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(P_fp ‖ P_q) per row, averaged over samples and rows."""
    p = teacher_log_probs.exp()
    return (p * (teacher_log_probs - student_log_probs)).sum(-1).mean()


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
    """MPQ-DMv2 MTRD: relation KL of the current pixels against a time-aware FIFO memory of the last
    ``memory_length`` steps of the same trajectories (see module doc). Call once per sampling step;
    returns the loss of that step (never None)."""

    kind = "memory"

    def __init__(self, memory_length: int = 4, temperature: float = 1.0, decay: float = 1.0):
        if isinstance(memory_length, bool) or not isinstance(memory_length, int) or memory_length < 0:
            raise ValueError(f"memory_length must be an int >= 0 (queued steps), got {memory_length!r}")
        if not isinstance(decay, (int, float)) or not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1] (weight of an entry = decay ** age), got {decay!r}")
        self.memory_length = memory_length
        self.temperature = _check_temperature(temperature)
        self.decay = float(decay)
        self.queue: deque = deque(maxlen=memory_length if memory_length > 0 else None)

    def reset(self) -> None:
        self.queue.clear()

    @property
    def timesteps(self) -> list:
        """Timesteps of the queued entries, oldest first."""
        return [e[0] for e in self.queue]

    def __call__(self, timestep, teacher_features: torch.Tensor, student_features: torch.Tensor) -> torch.Tensor:
        _check_pair(teacher_features, student_features)
        t = float(torch.as_tensor(timestep).float().reshape(-1)[0])
        ft = normalized_pixels(teacher_features.detach())
        fs = normalized_pixels(student_features)
        if self.queue and (t >= self.queue[-1][0] or self.queue[-1][1].shape != ft.shape):
            self.reset()  # time went up (new trajectory) or the batch changed: the memory is stale
        entries = [(ft, fs, 1.0)]
        for age, (_, mt, ms) in enumerate(reversed(self.queue), start=1):
            entries.append((mt.to(ft.device), ms.to(fs.device), self.decay ** age))
        total, norm = 0.0, 0.0
        for mt, ms, w in entries:
            kl = relation_kl(relation_log_probs(ft, mt, self.temperature),
                             relation_log_probs(fs, ms.detach() if ms is not fs else fs, self.temperature))
            total = total + w * kl
            norm += w
        if self.memory_length > 0:
            self.queue.append((t, ft.detach(), fs.detach()))
        return total / norm


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
