"""Settings of the near-duplicate stage, declared once (see preprocessing.settings)."""

from __future__ import annotations

from pydantic import Field

from preprocessing.settings import Device, ExistingFile, Settings


class DedupSettings(Settings):
    """The paper's autoencoder hash and the grouping radius."""

    radius: int = Field(0, ge=0, le=63, description="Hamming radius: 0 = identical codes (the paper)")
    autoencoder: ExistingFile = Field(None, description="trained autoencoder.pt to use instead of training one")
    device: Device = Field("cpu", description="auto, cpu, cuda or cuda:N, for training the autoencoder")
    max_epochs: int = Field(50, ge=1, description="autoencoder epochs at most (stops earlier on a plateau)")
    seed: int = Field(0, description="seed of the autoencoder's initialisation, noise and held-out split")
    retrain_autoencoder: bool = Field(
        False, description="train the hash again on every item (codes change: kept items may change too)"
    )
