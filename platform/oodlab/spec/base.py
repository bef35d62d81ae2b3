"""Base classes of every typed spec section: unknown fields are errors, not silent defaults."""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that forbids unknown fields and validates on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class MethodParams(StrictModel):
    """Base of each method's ``method:`` section; a method's subclass narrows ``name`` to a
    ``Literal`` and adds its knobs."""

    name: str
