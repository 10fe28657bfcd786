"""Settings of the near-duplicate stage, declared once (see preprocessing.settings)."""

from __future__ import annotations

from pydantic import Field

from dedup.verify import VerifyRule
from preprocessing.settings import Device, ExistingFile, Settings


class DedupSettings(Settings):
    """The paper's autoencoder hash proposes candidates within a radius; thumbnails verify them."""

    radius: int = Field(
        8, ge=0, le=63, description="Hamming radius of the hash's candidates (0 = identical codes, the paper)"
    )
    min_similarity: float = Field(
        0.94,
        ge=-1,
        le=1,
        description="thumbnail correlation a candidate pair needs to merge (-1: every candidate merges, the paper)",
    )
    low_content_rms: float = Field(
        4.0, ge=0, description="flat or dark crops merge only when their pixels differ by at most this RMS (0-255)"
    )
    bucket_cap: int = Field(
        64, ge=2, description="largest hash bucket expanded into pairs; larger ones are split by more bits"
    )
    autoencoder: ExistingFile = Field(None, description="trained autoencoder.pt to use instead of training one")
    device: Device = Field("cpu", description="auto, cpu, cuda or cuda:N, for training the autoencoder")
    max_epochs: int = Field(50, ge=1, description="autoencoder epochs at most (stops earlier on a plateau)")
    seed: int = Field(0, description="seed of the autoencoder's initialisation, noise and held-out split")
    retrain_autoencoder: bool = Field(
        False, description="train the hash again on every item (codes change: kept items may change too)"
    )

    def rule(self) -> VerifyRule:
        return VerifyRule(min_similarity=self.min_similarity, low_content_rms=self.low_content_rms)
