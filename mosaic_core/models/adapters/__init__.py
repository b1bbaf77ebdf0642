"""Model families behind one interface (`base.FamilyAdapter`): one file per family."""

from mosaic_core.models.adapters.base import (  # noqa: F401
    ClassCondition,
    FamilyAdapter,
    adapter_for_class,
    adapter_for_model,
    adapter_named,
    as_condition,
    concat_conditions,
    denoiser_class_name,
    move_condition,
    select_rows,
    supported_classes,
)
