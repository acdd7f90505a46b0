"""Language-model providers behind one interface (`base.Provider`); `simulated` is the
deterministic model used in development, tests and benches."""

from orchestrator.providers.base import (
    ContinuationMismatch,
    Provider,
    ProviderError,
    ProviderEvent,
    ProviderRequest,
    TextDelta,
    ToolCallRequest,
    ToolSpec,
    Usage,
)
from orchestrator.providers.simulated import SimulatedProvider, SimulatedSettings, full_answer

__all__ = [
    "ContinuationMismatch",
    "Provider",
    "ProviderError",
    "ProviderEvent",
    "ProviderRequest",
    "SimulatedProvider",
    "SimulatedSettings",
    "TextDelta",
    "ToolCallRequest",
    "ToolSpec",
    "Usage",
    "full_answer",
]
