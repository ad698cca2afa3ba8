"""Partition definitions shared by the assets (DESIGN.md: one `survey` partition per survey)."""

import dagster as dg

from lens_assets.science.surveys import SURVEY_NAMES

survey_partitions = dg.StaticPartitionsDefinition(list(SURVEY_NAMES))
