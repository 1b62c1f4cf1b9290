"""Base class for every params section: unknown keys are errors, sections are immutable."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
