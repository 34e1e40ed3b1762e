"""The base of every recipe section: unknown keys are errors, values immutable, numbers finite and never booleans."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from qtool.recipe.values import boolean_as_number, holds_bool


class Strict(BaseModel):
    """Unknown keys are errors; records are immutable once loaded; numbers are finite and never booleans."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML reads yes/no/on/off/true/false as booleans, which pydantic would take as 1 and 0."""
        annotation = cls.model_fields[info.field_name].annotation if info.field_name else None
        if boolean_as_number(value, annotation):
            key = next((k for k, v in value.items() if holds_bool(v)), None) if isinstance(value, dict) else None
            raise PydanticCustomError(
                "bool_number", "expected a number, not a boolean (YAML reads yes/no/on/off/true/false as booleans)",
                {"key": key} if key is not None else None)
        return value
